"""The training skeleton of the student trainer, the alignment stage and the teacher finetune.

Small parts in the spirit of torchtitan's ``components/``; each loop keeps only its loss (a
``train_step`` that runs forward + backward over its micro-batches) and its model set-up:

- :class:`OptimizerStep`: clip -> NaN guard -> optimizer step -> saddle detector -> LR schedule. A
  skipped (non-finite) step changes no weight and does NOT advance the schedule: the schedule counts
  optimizer updates (``updates``), the loop counts steps (batches consumed, checkpoints, logs).
- :class:`MetricWindow`: the mean of every per-step metric since the last log row, tokens/s, rows/s.
- :class:`Checkpointer`: the one checkpoint format, written atomically
  (:func:`distill_dag.training.checkpoint.save_checkpoint`); under torchrun every rank builds the
  contents (FSDP gathers), rank 0 writes, the others wait.
- :class:`TrainLoop`: the step loop. One step = ``train_step`` + :class:`OptimizerStep`; then, in this
  order: log every ``log_interval`` steps (and at the last), evaluate every ``eval_interval`` steps
  (0 = never), save every ``save_interval`` steps (0 = only at a stop or the end), and stop when a
  SIGINT/SIGTERM arrived (all ranks agree) or ``stop_after`` steps of this process are done: a
  checkpoint of the step reached, a ``stopped`` event, then :class:`TrainingInterrupted`. Used as a
  context manager: any other exception is recorded (a ``failed`` event, W&B exit code 1) and re-raised;
  telemetry is closed and the signal handlers restored whatever ends the run.

A failed run publishes nothing (:class:`~distill_dag.training.stability.TrainingFailedError`): the NaN
streak alone cannot catch a run shorter than ``max_nan_streak`` whose every step was skipped, nor an
update that left the weights NaN/Inf while its own loss was finite (e.g. a huge weight decay: every later
step is skipped, the weights never recover). So a checkpoint is never written of non-finite weights, nor
of a run that has not taken one update yet (it would look like a trained model), and a loop that ends
with every step of this process skipped, 0 tokens trained or non-finite weights raises instead of
returning: the callers write ``final`` only after ``run`` returns.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distill_dag.training import checkpoint as ckpt
from distill_dag.training.distributed import DistInfo, all_reduce_sum, barrier, clip_grad_norm
from distill_dag.training.stability import NanGuard, SaddleDetector, TrainingFailedError, nonfinite_tensors
from distill_dag.training.stopping import StopSignals
from distill_dag.training.telemetry import Telemetry


class TrainingInterrupted(KeyboardInterrupt):
    """A stop request (SIGINT/SIGTERM, or ``stop_after``) ended a loop early, after a checkpoint of
    ``step`` was written to ``checkpoint``. A KeyboardInterrupt, so ``except Exception`` lets it pass
    as it would Ctrl-C."""

    def __init__(self, what: str, step: int, checkpoint: Path | None, reason: str, signum: int | None,
                 resume_hint: str):
        why = f"signal {signum}" if signum is not None else reason
        super().__init__(f"{what} stopped at step {step} ({why}); checkpoint {checkpoint}; {resume_hint}")
        self.step, self.checkpoint, self.reason, self.signum = step, checkpoint, reason, signum


@dataclass
class StepOutput:
    """What one ``train_step`` reports (after its backward, before the optimizer step)."""

    loss: float  # the step's loss: the NaN guard checks it, the log window averages it
    tokens: int  # tokens consumed (the run's token count, tokens/s)
    rows: int  # rows consumed (rows/s)
    metrics: dict[str, float] = field(default_factory=dict)  # more per-step values to average (ce, kl, ...)


def memory_metrics(device: torch.device | None) -> dict[str, float]:
    """Memory in GiB: the process's resident set (``rss_gb``) and, on CUDA, the peak allocated
    (``mem_gb``) and reserved (``mem_reserved_gb``) memory of the device."""
    out = {"rss_gb": _rss_bytes() / 2**30}
    if device is not None and device.type == "cuda":
        out["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["mem_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # no procfs: the peak instead (KiB on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class OptimizerStep:
    """One update from the accumulated gradients, skipped when the loss or gradient norm is not finite.

    ``optimizer``/``scheduler``: a torch optimizer and LR scheduler, or the trainer's
    :class:`~distill_dag.training.optim.Optimizers`/``Schedulers``. ``clip``: what the gradient norm is
    measured (and clipped to ``grad_clip``; 0 = measure only) over: a module or a list of parameters.
    The saddle detector is fed the update count, the same clock as the schedule, so its LR boost
    starts at the update after the detection whatever steps were skipped."""

    def __init__(self, optimizer: Any, scheduler: Any, clip: Any, grad_clip: float, guard: NanGuard,
                 saddle: SaddleDetector | None = None):
        self.optimizer, self.scheduler, self.clip, self.grad_clip = optimizer, scheduler, clip, grad_clip
        self.guard, self.saddle = guard, saddle
        self.taken = 0  # updates taken by this process (the schedule's position also counts a resumed run's)

    @property
    def updates(self) -> int:
        """Optimizer updates taken (the schedule's position)."""
        return int(self.scheduler.last_epoch)

    def __call__(self, step: int, loss: float) -> tuple[float, list[dict[str, Any]]]:
        """Update (or skip) for loop step ``step``; returns the pre-clip gradient norm and the events."""
        grad_norm = clip_grad_norm(self.clip, self.grad_clip)
        skipped = self.guard.check(step, loss, grad_norm)  # raises TrainingDivergedError after the streak
        if skipped is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if skipped is not None:
            return grad_norm, [skipped]  # no update: the schedule stays where it is
        self.taken += 1
        events = self.saddle.update(self.updates, loss, grad_norm) if self.saddle is not None else []
        self.scheduler.step()
        return grad_norm, events

    def lrs(self) -> dict[str, float]:
        """The learning rate of the next update: ``lr_<name>`` per named optimizer, else ``lr``."""
        names = getattr(self.optimizer, "names", None)
        if names:
            return {f"lr_{n}": opt.param_groups[0]["lr"] for n, opt in zip(names, self.optimizer)}
        return {"lr": self.optimizer.param_groups[0]["lr"]}


class MetricWindow:
    """Sums of the per-step metrics since the last :meth:`reset`; :meth:`means` averages them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = self.tokens = self.rows = 0
        self.t = time.time()

    def add(self, out: StepOutput) -> None:
        for k, v in {"loss": out.loss, **out.metrics}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.tokens += out.tokens
        self.rows += out.rows

    def means(self) -> dict[str, float]:
        dt = max(time.time() - self.t, 1e-9)
        return {**{k: v / max(self.n, 1) for k, v in self.sums.items()},
                "tokens_per_s": self.tokens / dt, "rows_per_s": self.rows / dt}


@dataclass
class CheckpointContents:
    """What goes into one checkpoint (see :func:`distill_dag.training.checkpoint.save_checkpoint`)."""

    model: torch.nn.Module
    trainer_state: dict[str, Any]  # plain tensors / numbers / strings (torch.load(weights_only=True))
    run_info: dict[str, Any]
    extra_files: dict[str, Path] | None = None
    model_state: dict[str, torch.Tensor] | None = None  # the gathered weights of an FSDP-sharded model


class Checkpointer:
    """Writes ``<run_dir>/checkpoints/step-NNNNNNN`` from ``contents(step)``, keeping the ``keep`` newest."""

    def __init__(self, run_dir: Path, contents: Callable[[int], CheckpointContents], *, keep: int, tel: Telemetry,
                 dist_info: DistInfo | None = None, device: torch.device | None = None, fix: str | None = None):
        """``device``: where ranks agree (all-reduce) on the weights check; ``fix``: what a refusal of
        non-finite weights tells the user to change (a :class:`TrainLoop` sets its guard's)."""
        self.run_dir, self.contents, self.keep, self.tel = Path(run_dir), contents, keep, tel
        self.dist_info, self.device, self.fix = dist_info or DistInfo(), device, fix
        self.last: Path | None = None

    def save(self, step: int) -> Path:
        c = self.contents(step)  # on every rank: under FSDP building it gathers the shards
        path = self.run_dir / "checkpoints" / f"step-{step:07d}"
        # never a checkpoint of NaN/Inf weights: resuming it can only skip every step, and checkpoint_latest
        # would name it as the run's newest good state
        named = c.model_state.items() if c.model_state is not None else c.model.state_dict().items()
        check_finite(named, f"checkpoint {path} (step {step})", self.fix or "lower the learning rate or weight decay",
                     self.dist_info, self.device, latest=self.run_dir)
        if self.dist_info.is_main:
            path = ckpt.save_checkpoint(self.run_dir, step, c.model, c.trainer_state, c.run_info, keep=self.keep,
                                        extra_files=c.extra_files, model_state=c.model_state)
            self.tel.event(step, "checkpoint", path=str(path))
        barrier(self.dist_info)  # the other ranks go on once it is on disk
        self.last = path
        return path

    def ensure(self, step: int) -> Path:
        """The checkpoint of ``step``: the last one written if it is of ``step``, else a new one."""
        if self.last is not None and self.last.name == f"step-{step:07d}":
            return self.last
        return self.save(step)


def check_finite(named: Any, what: str, fix: str, dist_info: DistInfo, device: torch.device | None,
                 latest: Path | None = None) -> None:
    """Raise :class:`TrainingFailedError` when any tensor of ``named`` holds NaN/Inf (on any rank)."""
    bad = nonfinite_tensors(named)
    if dist_info.enabled:
        n_bad = int(all_reduce_sum(float(len(bad)), dist_info, device or torch.device("cpu")))
    else:
        n_bad = len(bad)
    if not n_bad:
        return
    kept = ""
    if latest is not None:
        pointer = Path(latest) / ckpt.LATEST
        kept = (f"; not written: {pointer} still names {ckpt.read_latest(Path(latest))}" if pointer.exists()
                else "; not written (no earlier checkpoint exists)")
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    raise TrainingFailedError(  # this rank's count when it has any (ranks of DDP hold the same weights)
        f"{what}: {len(bad) or n_bad} weight tensor(s) hold NaN or Inf ({shown or 'on another rank'}): an "
        f"optimizer update made them non-finite, and every later step can only be skipped{kept}. Nothing is "
        f"published. {fix}"
    )


class TrainLoop:
    """The step loop (see the module docstring). ``step``/``tokens``: where a resumed run starts.

    ``log_line(step, metrics)`` replaces the printed form of a train row. ``resume_hint`` ends the
    :class:`TrainingInterrupted` message (how to continue)."""

    def __init__(self, what: str, tel: Telemetry, *, optimizer_step: OptimizerStep, max_steps: int,
                 log_interval: int, eval_interval: int = 0, save_interval: int = 0,
                 checkpointer: Checkpointer | None = None, step: int = 0, tokens: int = 0,
                 stop_after: int | None = None, dist_info: DistInfo | None = None,
                 device: torch.device | None = None, resume_hint: str = "",
                 log_line: Callable[[int, dict[str, Any]], str] | None = None):
        self.what, self.tel, self.optimizer_step = what, tel, optimizer_step
        self.max_steps, self.log_interval = max_steps, log_interval
        self.eval_interval, self.save_interval = eval_interval, save_interval
        self.checkpointer, self.step, self.tokens, self.stop_after = checkpointer, step, tokens, stop_after
        self.dist_info, self.device = dist_info or DistInfo(), device
        self.resume_hint, self.log_line = resume_hint, log_line
        self.steps_here = 0  # steps of this process (stop_after counts these)
        self.tokens_here = 0  # tokens trained by this process
        if checkpointer is not None and checkpointer.fix is None:
            checkpointer.fix = optimizer_step.guard.fix
        if checkpointer is not None and checkpointer.device is None:
            checkpointer.device = device
        self.last: StepOutput | None = None
        self.last_eval: tuple[int, Any] | None = None
        self.window = MetricWindow()
        self.signals = StopSignals()

    def __enter__(self) -> "TrainLoop":
        self.signals.install()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> bool:
        self.signals.restore()
        if exc is None:
            self.tel.close()
        elif isinstance(exc, TrainingInterrupted):
            self.tel.close(exit_code=128 + exc.signum if exc.signum is not None else 0)
        else:
            self.tel.event(self.step, "failed", error=f"{type(exc).__name__}: {exc}")
            self.tel.close(exit_code=1)
        return False

    def run(self, train_step: Callable[[int], StepOutput], *, evaluate: Callable[[int], Any] | None = None,
            finished: Callable[[], bool] | None = None) -> None:
        """Steps until ``max_steps`` or ``finished()`` (e.g. early stopping). ``train_step(step)`` runs
        forward + backward of loop step ``step`` (0-based); ``evaluate(step)`` evaluates and logs."""
        while self.step < self.max_steps and not (finished is not None and finished()):
            out = train_step(self.step)
            grad_norm, events = self.optimizer_step(self.step, out.loss)
            for ev in events:
                ev = {k: v for k, v in ev.items() if k != "step"}
                self.tel.event(self.step, ev.pop("event"), **ev)
            self.step += 1
            self.steps_here += 1
            self.tokens += out.tokens
            self.tokens_here += out.tokens
            self.last = out
            self.tel.advance(rows=out.rows)
            self.window.add(out)
            if self.log_interval and (self.step % self.log_interval == 0 or self.step == self.max_steps):
                self._log(grad_norm)
            if evaluate is not None and self.eval_interval and self.step % self.eval_interval == 0:
                self.last_eval = (self.step, evaluate(self.step))
            if self.checkpointer is not None and self.save_interval and self.step % self.save_interval == 0:
                self._checkpoint(ensure=False)
            if self.step < self.max_steps and not (finished is not None and finished()):
                self._stop_if_asked()
        self._check_trained()

    def _checkpoint(self, *, ensure: bool) -> Path | None:
        """Save (or, ``ensure``, reuse) the checkpoint of the step reached; None, with a
        ``checkpoint_skipped`` event, while every step of this process has been skipped: that
        checkpoint would hold the starting weights under a step count that claims training."""
        if self.steps_here and not self.optimizer_step.taken:
            self.tel.event(self.step, "checkpoint_skipped",
                           reason=f"all {self.steps_here} steps of this run so far were non-finite and skipped")
            return None
        return self.checkpointer.ensure(self.step) if ensure else self.checkpointer.save(self.step)

    def _check_trained(self) -> None:
        """Refuse the end of a run that trained nothing usable (module doc); silent for a process that ran
        no step at all (resumed at ``max_steps``, or ``max_steps`` 0: nothing was asked of it)."""
        n = self.steps_here
        if not n:
            return
        span = f"steps {self.step - n + 1}..{self.step}" if n > 1 else f"step {self.step}"
        if not self.optimizer_step.taken:
            raise TrainingFailedError(
                f"{self.what}: all {n} step(s) of this run ({span}) had a non-finite loss or gradient norm and "
                f"were skipped (max_nan_streak {self.optimizer_step.guard.max_nan_streak} was not reached): no "
                f"weight was trained, so nothing is published (no final folder, no checkpoint of this run). "
                f"{self.optimizer_step.guard.fix}"
            )
        if not self.tokens_here:
            raise TrainingFailedError(
                f"{self.what}: {n} step(s) ({span}) trained 0 tokens (every batch was empty or all padding), so "
                "nothing is published; check the data: the rows' attention_mask and labels of tokenized_parquet"
            )
        clip = self.optimizer_step.clip
        named = (clip.named_parameters() if isinstance(clip, torch.nn.Module)
                 else ((f"trained parameter {i} {tuple(p.shape)}", p) for i, p in enumerate(clip)))
        check_finite(named, f"{self.what} after {span}", self.optimizer_step.guard.fix, self.dist_info, self.device)

    def final_eval(self, evaluate: Callable[[int], Any]) -> Any:
        """The evaluation of the step reached: the one the loop just did at this step, else a new one."""
        if self.last_eval is not None and self.last_eval[0] == self.step:
            return self.last_eval[1]
        self.last_eval = (self.step, evaluate(self.step))
        return self.last_eval[1]

    def _log(self, grad_norm: float) -> None:
        m = {**self.window.means(), "grad_norm": grad_norm, **self.optimizer_step.lrs(), "tokens": self.tokens,
             **memory_metrics(self.device)}
        self.tel.log(self.step, m, line=self.log_line(self.step, m) if self.log_line is not None else None)
        self.window.reset()

    def _stop_if_asked(self) -> None:
        signalled = bool(self.signals)
        if self.dist_info.enabled:  # every rank stops at the same step, even if only one got the signal
            signalled = all_reduce_sum(float(signalled), self.dist_info, self.device) > 0
        if not (signalled or (self.stop_after is not None and self.steps_here >= self.stop_after)):
            return
        path = self._checkpoint(ensure=True) if self.checkpointer is not None else None
        reason = "signal" if signalled else "stop_after"
        self.tel.event(self.step, "stopped", reason=reason)
        stop = TrainingInterrupted(self.what, self.step, path, reason, self.signals.signum if signalled else None,
                                   self.resume_hint)
        self.tel.info(str(stop))  # how to resume, in the run's own log whoever catches the exception
        raise stop
