"""Training telemetry: stdout (a progress bar or progress lines), ``train.log``, ``metrics.jsonl`` and W&B.

W&B runs offline unless ``WANDB_API_KEY`` is set (``wandb.mode: auto``), so a run never needs an
account; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later. Every stage of one pipeline
config lands in one W&B group (:func:`wandb_group`), told apart by ``job_type`` (``teacher_ft``,
``align``, ``kd``, ``ce_only``, ``eval``), so the KD student and its CE-only baseline sit side by side.
A run that fails finishes in W&B with a non-zero exit code (``close(exit_code=...)``).

Progress: in a terminal (stderr is a TTY) a tqdm bar shows step i/N, steps/s, rows/s and the ETA;
elsewhere (Dagster's run log, a batch job's log file) the same goes out as a line every
``progress_interval_s`` seconds and at the last step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from distill_dag.config import PipelineConfig, WandbConfig
from distill_dag.io import sha256_json

# train keys that differ between the runs of one experiment (the KD student, its CE-only baseline, a
# CE -> KD continuation, a resumed or relaunched run) and so stay out of its W&B group
_NOT_IN_GROUP = ("pretrain_ce_only", "resume_from", "output_dir", "ce_only_baseline", "teacher_mode",
                 "device", "launcher", "nproc_per_node", "parallel", "dist_timeout_s", "log_interval", "eval_interval",
                 "save_interval", "keep_checkpoints")


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    # wandb's own switch, as seed users (and wandb's docs) set it, is honoured before the key's presence
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "offline", "online"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_group(cfg: PipelineConfig) -> str:
    """The W&B group of every stage run from ``cfg``: ``<student variant>-<hash of the config>``, the
    hash leaving out what differs between paired runs (``_NOT_IN_GROUP``, ``student.init``) and the W&B
    section."""
    d = cfg.model_dump(mode="json")
    d.pop("wandb", None)
    d.get("student", {}).pop("init", None)  # the CE-only baseline of a from_teacher student starts from scratch
    for k in _NOT_IN_GROUP:
        d.get("train", {}).pop(k, None)
    return f"{cfg.student.variant}-{sha256_json(d)[:8]}"


class Telemetry:
    """One sink for everything a run reports. ``log(step, metrics)``; ``event(step, kind, **info)``."""

    def __init__(
        self,
        run_dir: Path,
        wandb_cfg: WandbConfig,
        run_config: dict[str, Any],
        *,
        total_steps: int,
        echo: Callable[[str], None] | None = None,
        progress: bool = True,
        resume_id: str | None = None,
        enabled: bool = True,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        start_step: int = 0,
        progress_desc: str = "train",
        progress_interval_s: float = 30.0,
    ) -> None:
        """``enabled=False`` (ranks other than 0) keeps the history in memory and writes nothing.
        ``name``/``group``/``job_type``/``tags`` go to ``wandb.init``; ``start_step`` is where a resumed
        run's progress starts."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger(f"distill_dag.train.{self.run_dir.name}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.handlers.clear()
        if enabled:
            fh = logging.FileHandler(self.run_dir / "train.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.logger.addHandler(fh)
        self.echo = echo
        self.metrics_file = open(self.run_dir / "metrics.jsonl" if enabled else os.devnull, "a")
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.total_steps = int(total_steps)
        self.step = self.start_step = int(start_step)
        self.rows = 0
        self.progress_desc = progress_desc
        self.progress_interval_s = float(progress_interval_s)
        self._last_progress = self.t0
        self.progress_lines = enabled and progress and not sys.stderr.isatty()
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=self.start_step, desc=progress_desc, unit="step",
                            dynamic_ncols=True)
        self.wandb_run = None
        self.wandb_dir: str | None = None
        mode = wandb_mode(wandb_cfg)
        if enabled and mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                mode=mode,
                dir=str(self.run_dir),
                config=run_config,
                id=resume_id,
                resume="allow" if resume_id else None,
                reinit="finish_previous",
                name=name,
                group=group,
                job_type=job_type,
                tags=tags,
            )
            self.wandb_dir = str(Path(self.wandb_run.dir).parent)

    @property
    def wandb_url(self) -> str | None:
        return getattr(self.wandb_run, "url", None) if self.wandb_run is not None else None

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        self.logger.info(msg)
        if self.echo is not None:
            self.echo(msg)
        elif self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, step: int, metrics: dict[str, Any], *, kind: str = "train", line: str | None = None) -> None:
        """One row of ``metrics.jsonl`` (and W&B, as ``<kind>/<name>``); ``line`` replaces the printed
        ``[kind step] name=value ...``."""
        row = {"step": step, "kind": kind, "time_s": round(time.time() - self.t0, 3), **metrics}
        self.history.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)
        self.info(line if line is not None else f"[{kind} {step}] " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def event(self, step: int, kind: str, **info: Any) -> None:
        row = {"step": step, "event": kind, **info}
        self.events.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"events/{kind}": 1}, step=step)
        self.info(f"[event {step}] {kind} " + " ".join(f"{k}={_fmt(v)}" for k, v in info.items()))

    def summary(self, values: dict[str, Any]) -> None:
        """Final numbers of the run (W&B run summary; also one ``summary`` row of ``metrics.jsonl``)."""
        self.metrics_file.write(json.dumps({"summary": values}, default=str) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def advance(self, n: int = 1, *, rows: int = 0) -> None:
        """``n`` more steps done (``rows`` rows consumed by them): the bar, or a progress line when due."""
        self.step += n
        self.rows += rows
        now = time.time()
        if self.bar is not None:
            self.bar.update(n)
            if rows:
                self.bar.set_postfix_str(f"{self.rows / max(now - self.t0, 1e-9):,.1f} rows/s", refresh=False)
        elif self.progress_lines and (now - self._last_progress >= self.progress_interval_s
                                      or self.step == self.total_steps):
            self._last_progress = now
            self.info(self.progress_line(now))

    def progress_line(self, now: float | None = None) -> str:
        """``<desc> i/N steps (p%), s steps/s, r rows/s, ETA h:mm:ss`` since this process started."""
        dt = max((now or time.time()) - self.t0, 1e-9)
        done = self.step - self.start_step
        rate = done / dt
        left = max(self.total_steps - self.step, 0)
        eta = _hms(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.step / self.total_steps if self.total_steps else 100.0
        return (f"{self.progress_desc} {self.step}/{self.total_steps} steps ({pct:.0f}%), {rate:.3g} steps/s, "
                f"{self.rows / dt:,.1f} rows/s, ETA {eta}")

    def close(self, exit_code: int = 0) -> None:
        """``exit_code`` != 0 marks the W&B run failed (a diverged or crashed run)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.metrics_file.closed:
            self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


def progress(items: Iterable[Any], *, total: int | None, desc: str, echo: Callable[[str], None] | None = None,
             interval_s: float = 30.0) -> Iterator[Any]:
    """``items`` with the progress of :class:`Telemetry` (a bar in a terminal, else a line every
    ``interval_s`` seconds through ``echo`` or print), for loops outside training such as evaluation."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    say = echo or (lambda m: print(m, flush=True))
    t0 = last = time.time()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.time()
        if now - last >= interval_s or i == total:
            last = now
            rate = i / max(now - t0, 1e-9)
            eta = _hms((total - i) / rate) if total and rate > 0 else "?"
            say(f"{desc} {i}/{total if total is not None else '?'} ({rate:.3g}/s, ETA {eta})")


def log_eval_run(cfg: PipelineConfig, out_dir: str | Path, metrics: dict[str, Any], *,
                 tables: dict[str, list[dict[str, Any]]] | None = None,
                 echo: Callable[[str], None] | None = None) -> dict[str, str | None]:
    """Record one evaluation in W&B (job_type ``eval``, the training runs' group) and in
    ``<out_dir>/metrics.jsonl``: ``metrics`` (numbers) as the summary, each of ``tables`` (name ->
    rows of one dict each) as a W&B table. Returns ``{"wandb_url", "wandb_dir"}``."""
    out = Path(out_dir)
    tel = Telemetry(out, cfg.wandb, cfg.model_dump(mode="json"), total_steps=0, echo=echo, progress=False,
                    name=f"eval-{out.parent.name or out.name}", group=wandb_group(cfg), job_type="eval",
                    tags=["eval", cfg.student.variant])
    try:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tel.log(0, scalars, kind="eval")
        tel.summary(scalars)
        if tel.wandb_run is not None and tables:
            import wandb

            for name, rows in tables.items():
                cols = list(rows[0]) if rows else []
                tel.wandb_run.log({f"eval/{name}": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        where = {"wandb_url": tel.wandb_url, "wandb_dir": tel.wandb_dir}
    except BaseException:
        tel.close(exit_code=1)
        raise
    tel.close()
    return where


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
