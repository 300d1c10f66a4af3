"""Training telemetry: stdout (with a progress bar), ``train.log``, ``metrics.jsonl`` and W&B.

W&B runs offline unless ``WANDB_API_KEY`` is set (``wandb.mode: auto``), so a run never needs an
account; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from distill_dag.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Telemetry:
    """One sink for everything a run reports. ``log(step, metrics)``; ``event(kind, **info)``."""

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
    ) -> None:
        """``enabled=False`` (ranks other than 0) keeps the history in memory and writes nothing."""
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
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)
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

    def log(self, step: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
        row = {"step": step, "kind": kind, "time_s": round(time.time() - self.t0, 3), **metrics}
        self.history.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        self.info(f"[{kind} {step}] {parts}")

    def event(self, step: int, kind: str, **info: Any) -> None:
        row = {"step": step, "event": kind, **info}
        self.events.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"events/{kind}": 1}, step=step)
        self.info(f"[event {step}] {kind} " + " ".join(f"{k}={_fmt(v)}" for k, v in info.items()))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
