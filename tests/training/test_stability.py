"""NaN/Inf guard and saddle detector on synthetic loss curves."""

import io
import json
import math

import pytest
import torch
from torch import nn

from distill_dag.config import TrainConfig
from distill_dag.training.optim import build_optimizers, build_schedulers, make_lr_lambda
from distill_dag.training.stability import NanGuard, SaddleDetector, TrainingDivergedError

W = 50


def _detector(enable=True, **kw):
    args = dict(window=W, rel_improvement=0.01, grad_norm_threshold=0.05, lr_boost=3.0, boost_steps=20,
                cooldown=200, enable_interventions=enable)
    args.update(kw)
    return SaddleDetector(**args)


def _noise(n, std, seed):
    return (std * torch.randn(n, generator=torch.Generator().manual_seed(seed))).tolist()


def _feed(det, losses, grad_norms, start=0):
    events = []
    for i, (l, g) in enumerate(zip(losses, grad_norms)):
        events += det.update(start + i, l, g)
    return events


def test_plateau_with_small_gradients_is_detected_once_the_window_is_full():
    det = _detector(enable=False)
    losses = [2.0 + e for e in _noise(150, 1e-3, 0)]
    events = _feed(det, losses, [0.01] * 150)
    assert [e["event"] for e in events] == ["saddle_detected"]
    assert events[0]["step"] == 2 * W - 1  # first step with two full windows
    assert abs(events[0]["rel_improvement"]) < 0.01 and events[0]["grad_norm_mean"] == pytest.approx(0.01)
    assert det.lr_multiplier(2 * W) == 1.0  # detection only: no boost without the flag


def test_steady_descent_is_not_a_saddle_even_with_tiny_gradients():
    det = _detector()
    losses = [5.0 - 0.002 * t for t in range(1000)]  # 0.1 per window: >= 2.5 % of the loss
    assert _feed(det, losses, [0.01] * 1000) == []


def test_noisy_descent_is_not_a_saddle():
    det = _detector()
    # step noise 25x the per-step progress; window means average it out
    losses = [5.0 - 0.002 * t + e for t, e in enumerate(_noise(1000, 0.05, 1))]
    assert _feed(det, losses, [0.01] * 1000) == []


def test_plateau_with_large_gradients_is_not_a_saddle():
    det = _detector()
    assert _feed(det, [2.0] * 500, [1.0] * 500) == []


def test_boost_shape_decays_linearly_back_to_one_and_cooldown_spaces_interventions():
    det = _detector(boost_steps=20, cooldown=200, lr_boost=3.0)
    events = _feed(det, [2.0] * 600, [0.01] * 600)
    kinds = [(e["event"], e["step"]) for e in events]
    s0 = 2 * W - 1
    boost_end = s0 + 1 + 20
    s1 = boost_end + 200  # history refilled during the cooldown (2W < 200), so exactly at its end
    s2 = s1 + 1 + 20 + 200
    assert kinds == [("saddle_detected", s0), ("saddle_intervention", s0),
                     ("saddle_detected", s1), ("saddle_intervention", s1),
                     ("saddle_detected", s2), ("saddle_intervention", s2)]
    assert events[1]["boost_start"] == s0 + 1 and events[1]["boost_end"] == boost_end
    assert det.interventions == 3 and det.detections == 3
    # the multiplier of the LAST boost (s2): 3 at its start, linear back to 1, bounded by lr_boost
    got = [det.lr_multiplier(s2 + 1 + i) for i in range(-1, 22)]
    want = [1.0] + [1.0 + 2.0 * (1 - i / 20) for i in range(20)] + [1.0, 1.0]
    assert got == pytest.approx(want)
    assert max(got) == 3.0


def test_cooldown_shorter_than_window_waits_for_two_fresh_windows():
    det = _detector(boost_steps=10, cooldown=0)
    events = _feed(det, [2.0] * 400, [0.01] * 400)
    steps = [e["step"] for e in events if e["event"] == "saddle_detected"]
    s0 = 2 * W - 1
    assert steps[:2] == [s0, s0 + 1 + 10 + 2 * W - 1]


def test_state_round_trip_continues_exactly():
    losses = [2.0 + e for e in _noise(700, 1e-3, 2)]
    grads = [0.01] * 700
    full = _detector()
    full_events = _feed(full, losses, grads)
    full_mult = [full.lr_multiplier(s) for s in range(700)]

    first = _detector()
    ev1 = _feed(first, losses[:137], grads[:137])  # stop mid-boost (boost starts at 100)
    buf = io.BytesIO()
    torch.save({"saddle": first.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["saddle"]
    json.dumps(state)  # plain values only
    resumed = _detector()
    resumed.load_state_dict(state)
    ev2 = _feed(resumed, losses[137:], grads[137:], start=137)
    assert ev1 + ev2 == full_events and len(full_events) >= 4
    assert [resumed.lr_multiplier(s) for s in range(700)] == full_mult


def test_boost_composes_with_the_lr_schedule_for_its_whole_duration():
    cfg = TrainConfig(warmup_steps=5, max_steps=400, min_lr_ratio=0.1, learning_rate=1e-3, optimizer="adamw",
                      enable_saddle_interventions=True, saddle_window=10, saddle_boost_steps=8,
                      saddle_cooldown=50, saddle_lr_boost=2.0)
    model = nn.Linear(4, 4)
    opts = build_optimizers(model, cfg)
    det = SaddleDetector.from_config(cfg)
    scheds = build_schedulers(opts, cfg, multiplier=det.lr_multiplier)
    plain = make_lr_lambda(cfg)
    lrs, events = [], []
    for s in range(60):
        lrs.append(opts[0].param_groups[0]["lr"])
        opts.step()
        events += det.update(s, 1.0, 0.001)
        scheds.step()
    start = next(e for e in events if e["event"] == "saddle_intervention")["boost_start"]
    assert start == 20
    for s in range(60):
        boost = 1.0 + (2.0 - 1.0) * (1 - (s - start) / 8) if start <= s < start + 8 else 1.0
        assert lrs[s] == pytest.approx(1e-3 * plain(s) * boost), s
    assert lrs[start] / (1e-3 * plain(start)) == pytest.approx(2.0)
    assert lrs[start + 7] / (1e-3 * plain(start + 7)) == pytest.approx(1.125)  # still boosted at its last step


def test_bad_saddle_settings_are_named():
    with pytest.raises(ValueError, match="train.saddle_lr_boost"):
        _detector(lr_boost=0.5)
    with pytest.raises(ValueError, match="train.saddle_window"):
        _detector(window=0)


def test_nan_guard_skips_counts_resets_and_raises_after_the_streak():
    guard = NanGuard(max_nan_streak=3)
    assert guard.check(0, torch.tensor(1.5), torch.tensor(0.3)) is None
    ev = guard.check(1, torch.tensor(float("nan")), 0.3)
    assert ev["event"] == "nonfinite_step_skipped" and ev["streak"] == 1 and ev["skipped_total"] == 1
    assert guard.check(2, 1.0, float("inf"))["streak"] == 2  # an Inf gradient norm counts too
    assert guard.check(3, 1.0, 0.2) is None and guard.streak == 0 and guard.skipped_total == 2
    guard.check(4, float("nan"), 0.2)
    state = guard.state_dict()
    resumed = NanGuard(3)
    resumed.load_state_dict(state)
    resumed.check(5, float("-inf"), 0.2)
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps.*train.max_nan_streak"):
        resumed.check(6, float("nan"), float("nan"))
    assert resumed.skipped_total == 5


def test_nonfinite_updates_are_not_recorded_by_the_detector():
    det = _detector(enable=False)
    _feed(det, [2.0] * 60 + [math.nan] * 10 + [2.0] * 39, [0.01] * 109)
    assert det.detections == 0  # only 99 finite steps recorded
    assert det.update(109, 2.0, 0.01)[0]["event"] == "saddle_detected"
