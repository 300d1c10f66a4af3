"""Training stability: a non-finite guard and a saddle-point (plateau) detector with an LR boost.

Both return event dicts for the log / W&B and have ``state_dict()`` / ``load_state_dict()`` of plain
Python values (safe for ``torch.load(weights_only=True)``), so a resumed run continues exactly.

Use in a training step (what :class:`distill_dag.training.loop.OptimizerStep` does; u = optimizer
updates taken so far, the schedule's position, which a skipped step does not advance)::

    loss = mean loss over the accumulated micro-batches; gn = clip_grad_norm_(params, clip)  (pre-clip norm)
    ev = nan_guard.check(step, loss, gn)        # raises TrainingDivergedError after max_nan_streak in a row
    if ev: log(ev); optimizers.zero_grad(); continue    # step skipped: no optimizer/scheduler step, u unchanged
    optimizers.step(); optimizers.zero_grad()
    for ev in saddle.update(u, loss, gn): log(ev)
    schedulers.step()                           # LR factor for update u + 1 includes saddle.lr_multiplier(u + 1)
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch


_TRAIN_FIX = ("Lower train.learning_rate / train.muon_learning_rate / train.weight_decay, check the data, or "
              "raise train.max_nan_streak")


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class TrainingFailedError(TrainingDivergedError):
    """A run that trained nothing usable: every step of it skipped, no token trained, or weights that an
    update left NaN/Inf. Raised before anything is published (no ``final``, no checkpoint of that state).
    A :class:`TrainingDivergedError`, so whoever stops on a diverged run stops on this one too."""


def nonfinite_tensors(named: Any) -> list[str]:
    """Names of the floating tensors of ``named`` (``(name, tensor)`` pairs) that hold a NaN or Inf.

    Sharded (FSDP DTensor) parameters are checked on this rank's shard: callers all-reduce the count."""
    bad = []
    for name, t in named:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
    return bad


def _as_float(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


class NanGuard:
    """Skip steps whose loss or gradient norm is NaN/Inf; fail after ``max_nan_streak`` in a row.

    A finite step resets the streak. ``skipped_total`` counts every skipped step of the run."""

    def __init__(self, max_nan_streak: int, fix: str = _TRAIN_FIX):
        """``fix``: what the divergence error tells the user to do."""
        if max_nan_streak < 1:
            raise ValueError(f"train.max_nan_streak must be >= 1, got {max_nan_streak}")
        self.max_nan_streak = int(max_nan_streak)
        self.fix = fix
        self.streak = 0
        self.skipped_total = 0

    def check(self, step: int, loss: Any, grad_norm: Any) -> dict[str, Any] | None:
        """None when both are finite (take the step); else an event dict (skip the step).
        Raises TrainingDivergedError on the ``max_nan_streak``-th consecutive non-finite step."""
        loss_f, gn_f = _as_float(loss), _as_float(grad_norm)
        if math.isfinite(loss_f) and math.isfinite(gn_f):
            self.streak = 0
            return None
        self.streak += 1
        self.skipped_total += 1
        event = {"event": "nonfinite_step_skipped", "step": int(step), "loss": loss_f, "grad_norm": gn_f,
                 "streak": self.streak, "skipped_total": self.skipped_total}
        if self.streak >= self.max_nan_streak:
            raise TrainingDivergedError(
                f"{self.streak} consecutive steps with non-finite loss or gradient norm (last at step {step}: "
                f"loss={loss_f}, grad_norm={gn_f}); the run has diverged. {self.fix}"
            )
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state["streak"])
        self.skipped_total = int(state["skipped_total"])


class SaddleDetector:
    """Loss-plateau + small-gradient detector with an optional bounded, decaying LR boost.

    Over the last 2W recorded steps (W = ``window``), with the previous window's mean loss L_prev,
    the current window's mean loss L_cur and mean (pre-clip) gradient norm G_cur::

        rel = (L_prev - L_cur) / |L_prev|
        saddle  <=>  rel < rel_improvement  AND  G_cur < grad_norm_threshold

    Window means make it robust to step-to-step noise; the gradient condition separates a saddle /
    flat region from a loss that merely stalls with large, conflicting gradients.

    Intervention (``enable_interventions``), detected after step s: for N = ``boost_steps`` steps
    starting at s + 1 the LR multiplier is::

        m(s + 1 + i) = 1 + (lr_boost - 1) * (1 - i / N),   i = 0 .. N-1;   1 afterwards

    i.e. a spike of ``lr_boost`` (the bound) that decays linearly back to 1. It multiplies the
    scheduler's factor (``optim.make_lr_lambda(multiplier=detector.lr_multiplier)``) at every step of
    the boost. After a detection the history is cleared; steps during the boost are not recorded,
    and no new detection happens before ``cooldown`` steps after the boost ends (after the detection
    step when interventions are off), so one plateau gives one event, not one per step.
    """

    def __init__(self, window: int, rel_improvement: float, grad_norm_threshold: float, lr_boost: float,
                 boost_steps: int, cooldown: int, enable_interventions: bool = False):
        if window < 1:
            raise ValueError(f"train.saddle_window must be >= 1, got {window}")
        if lr_boost < 1.0:
            raise ValueError(f"train.saddle_lr_boost must be >= 1 (a boost, not a cut), got {lr_boost}")
        if boost_steps < 1:
            raise ValueError(f"train.saddle_boost_steps must be >= 1, got {boost_steps}")
        if cooldown < 0:
            raise ValueError(f"train.saddle_cooldown must be >= 0, got {cooldown}")
        self.window = int(window)
        self.rel_improvement = float(rel_improvement)
        self.grad_norm_threshold = float(grad_norm_threshold)
        self.lr_boost = float(lr_boost)
        self.boost_steps = int(boost_steps)
        self.cooldown = int(cooldown)
        self.enable_interventions = bool(enable_interventions)
        self._losses: deque[float] = deque(maxlen=2 * self.window)
        self._grad_norms: deque[float] = deque(maxlen=self.window)
        self.boost_start: int | None = None  # first step whose LR is boosted
        self.record_from = 0  # steps before this are not recorded (inside a boost)
        self.quiet_until = 0  # no detection before this step
        self.detections = 0
        self.interventions = 0

    @classmethod
    def from_config(cls, train_cfg) -> "SaddleDetector":
        return cls(
            window=train_cfg.saddle_window,
            rel_improvement=train_cfg.saddle_rel_improvement,
            grad_norm_threshold=train_cfg.saddle_grad_norm,
            lr_boost=train_cfg.saddle_lr_boost,
            boost_steps=train_cfg.saddle_boost_steps,
            cooldown=train_cfg.saddle_cooldown,
            enable_interventions=train_cfg.enable_saddle_interventions,
        )

    def lr_multiplier(self, step: int) -> float:
        """LR factor for ``step`` (1.0 outside a boost)."""
        if self.boost_start is None:
            return 1.0
        i = step - self.boost_start
        if 0 <= i < self.boost_steps:
            return 1.0 + (self.lr_boost - 1.0) * (1.0 - i / self.boost_steps)
        return 1.0

    def update(self, step: int, loss: Any, grad_norm: Any) -> list[dict[str, Any]]:
        """Record the step just taken (``step`` = its index) and return the events it triggers."""
        loss_f, gn_f = _as_float(loss), _as_float(grad_norm)
        if step < self.record_from or not (math.isfinite(loss_f) and math.isfinite(gn_f)):
            return []
        self._losses.append(loss_f)
        self._grad_norms.append(gn_f)
        if step < self.quiet_until or len(self._losses) < 2 * self.window:
            return []
        losses = list(self._losses)
        prev = sum(losses[: self.window]) / self.window
        cur = sum(losses[self.window :]) / self.window
        gn = sum(self._grad_norms) / self.window
        rel = (prev - cur) / max(abs(prev), 1e-12)
        if not (rel < self.rel_improvement and gn < self.grad_norm_threshold):
            return []
        self.detections += 1
        events: list[dict[str, Any]] = [{
            "event": "saddle_detected", "step": int(step), "rel_improvement": rel, "grad_norm_mean": gn,
            "loss_window_mean": cur, "window": self.window, "detections": self.detections,
        }]
        self._losses.clear()
        self._grad_norms.clear()
        if self.enable_interventions:
            self.interventions += 1
            self.boost_start = int(step) + 1
            self.record_from = self.boost_start + self.boost_steps
            self.quiet_until = self.record_from + self.cooldown
            events.append({
                "event": "saddle_intervention", "step": int(step), "lr_boost": self.lr_boost,
                "boost_start": self.boost_start, "boost_end": self.record_from,
                "boost_steps": self.boost_steps, "interventions": self.interventions,
            })
        else:
            self.record_from = int(step) + 1
            self.quiet_until = int(step) + 1 + self.cooldown
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self._losses), "grad_norms": list(self._grad_norms), "boost_start": self.boost_start,
            "record_from": self.record_from, "quiet_until": self.quiet_until, "detections": self.detections,
            "interventions": self.interventions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses = deque((float(x) for x in state["losses"]), maxlen=2 * self.window)
        self._grad_norms = deque((float(x) for x in state["grad_norms"]), maxlen=self.window)
        self.boost_start = None if state["boost_start"] is None else int(state["boost_start"])
        self.record_from = int(state["record_from"])
        self.quiet_until = int(state["quiet_until"])
        self.detections = int(state["detections"])
        self.interventions = int(state["interventions"])
