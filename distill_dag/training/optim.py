"""Optimizers and the LR schedule: Muon for the blocks' weight matrices, AdamW for everything else.

Parameter split (``split_parameters``), over trainable parameters:

* **muon**: 2-D ``weight`` of an ``nn.Linear`` that is not the LM head (``get_output_embeddings()``
  or a name containing ``lm_head``) and not tied to an embedding: the attention/retention and MLP
  projections inside the blocks. Muon orthogonalises their updates (Newton-Schulz); it is meant for
  hidden-layer matrices only, so embeddings and the LM head (one row per token, updated sparsely)
  never go to it.
* **adamw decay**: every other parameter with ndim >= 2 (embeddings, LM head, other matrices).
* **adamw no_decay**: ndim < 2 (norm gains, biases, RetNet decays) and any name containing
  ``norm``, ``bias`` or ``decay``: weight decay would pull gains/decays toward 0, which is not a
  regulariser for them.

``optimizer: adamw`` puts the muon set into the AdamW decay group instead (plain AdamW).
We use ``torch.optim.Muon`` (present in torch 2.13), lr = ``muon_learning_rate``, decoupled weight
decay ``weight_decay``, Nesterov momentum ``muon_momentum``, LR shape adjustment ``muon_adjust_lr``,
through :class:`Muon`, which only adds the dtype of the Newton-Schulz iteration (``muon_ns_dtype``):
torch's casts to bfloat16, which a CPU without native bf16 emulates slowly (``python bench/cpu_paths.py``
on the 2-core AVX2 VM: a Muon step over the demo student's matrices 19x slower in bf16 than fp32). ``auto`` keeps bf16 (torch's own step, unchanged) on CUDA and on CPUs with native bf16
(AMX, AVX512-BF16), and uses fp32 on other CPUs.

LR schedule (``make_lr_lambda``), a LambdaLR factor on each group's base LR, for the step s about
to be taken (s = number of optimizer steps done so far)::

    f(s) = (s + 1) / warmup_steps                                          s < warmup_steps
         = r + (1 - r) * 0.5 * (1 + cos(pi * min(1, (s - warmup) / (max_steps - warmup))))   after
    factor(s) = f(s) * multiplier(s)        multiplier = SaddleDetector.lr_multiplier (1 when idle)

with r = ``min_lr_ratio``. The factor is recomputed from s at every ``scheduler.step()``, so a saddle
boost composes with the schedule for every step of its duration (it is never overwritten).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from distill_dag.device import cpu_has_native_bf16
from distill_dag.training.distributed import full_state_options

_NO_DECAY_WORDS = ("norm", "bias", "decay")


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """``torch.optim._muon._zeropower_via_newtonschulz`` with the iteration in ``dtype`` (torch's is bf16).

    The same quintic iteration: X = G / ||G||_F (the wide orientation), then ``steps`` times
    A = X X^T, B = b A + c A A, X = a X + B X. ``update`` is never written to (it may be the
    momentum buffer itself)."""
    if update.ndim != 2:
        raise ValueError("Muon orthogonalises 2-D matrices only")
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton-Schulz iteration runs in ``ns_dtype``.

    With ``ns_dtype=torch.bfloat16`` the step is torch's own. Otherwise the same update (Nesterov
    momentum by ``lerp``, decoupled weight decay, torch's LR shape adjustment) with the iteration in
    ``ns_dtype``. The state (``momentum_buffer``) and param groups are torch's, so checkpoints move
    between the two either way; ``ns_dtype`` is an attribute, not a param-group key."""

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        from torch.optim._muon import _adjust_lr

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, mom = float(group["lr"]), group["momentum"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - mom)
                update = g.lerp(buf, mom) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def ns_dtype_for(choice: str, device: torch.device) -> torch.dtype:
    """``train.muon_ns_dtype``: auto = bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere."""
    if choice == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[choice]


def _excluded_from_muon(model: nn.Module) -> set[int]:
    """ids of the embedding / LM-head tensors (input and output embeddings, tied or not)."""
    out: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        mod = fn() if callable(fn) else None
        if isinstance(mod, nn.Module):
            out.update(id(p) for p in mod.parameters())
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or "lm_head" in name or "embed" in name:
            out.update(id(p) for p in mod.parameters())
    return out


def split_parameters(model: nn.Module, use_muon: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters as {"muon": [...], "decay": [...], "no_decay": [...]} of (name, param);
    each tensor appears once (tied weights under their first name)."""
    excluded = _excluded_from_muon(model)
    linear_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not None
    }
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():  # de-duplicates tied tensors
        if not p.requires_grad:
            continue
        lname = name.lower()
        if p.ndim < 2 or any(w in lname for w in _NO_DECAY_WORDS):
            groups["no_decay"].append((name, p))
        elif use_muon and p.ndim == 2 and id(p) in linear_weights and id(p) not in excluded:
            groups["muon"].append((name, p))
        else:
            groups["decay"].append((name, p))
    return groups


class Optimizers(list):
    """The run's optimizers (a list of ``torch.optim.Optimizer``), stepped and checkpointed together.

    ``state_dict(model)`` is ``{name: that optimizer's state by parameter name}``; ``load_state_dict``
    refuses a checkpoint whose optimizer set differs (e.g. saved with ``optimizer: adamw``, resumed with ``muon``)."""

    def __init__(self, named: dict[str, torch.optim.Optimizer]):
        super().__init__(named.values())
        self.names = list(named)

    def step(self) -> None:
        for opt in self:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self for g in opt.param_groups]

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """``{name: state}``, each keyed by parameter NAME of ``model`` (the module the parameters
        belong to, possibly FSDP/DDP wrapped) with whole tensors, so it loads at any world size. Under
        FSDP every rank must call it (it gathers) and rank 0 gets the tensors."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {name: get_optimizer_state_dict(model, opt, options=full_state_options())
                for name, opt in zip(self.names, self)}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Load what ``state_dict`` wrote (sharding it again under FSDP)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if sorted(state) != sorted(self.names):
            raise ValueError(
                f"optimizer state holds {sorted(state)} but this run builds {sorted(self.names)}: "
                "resume with the same train.optimizer (and model) as the checkpoint"
            )
        for name, opt in zip(self.names, self):
            set_optimizer_state_dict(model, opt, optim_state_dict=state[name], options=full_state_options())

    def by_name(self, name: str) -> torch.optim.Optimizer:
        return self[self.names.index(name)]


def build_optimizers(model: nn.Module, train_cfg) -> Optimizers:
    """Muon (block matrices) + AdamW (rest) for ``train_cfg.optimizer == "muon"``, else one AdamW.

    train_cfg: ``TrainConfig`` (learning_rate, muon_learning_rate, weight_decay, betas,
    muon_momentum, muon_adjust_lr, muon_ns_dtype, adam_eps)."""
    use_muon = train_cfg.optimizer == "muon"
    groups = split_parameters(model, use_muon=use_muon)
    adam_groups = [
        {"params": [p for _, p in groups["decay"]], "weight_decay": train_cfg.weight_decay, "group": "decay"},
        {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0, "group": "no_decay"},
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    named: dict[str, torch.optim.Optimizer] = {}
    if use_muon and groups["muon"]:
        muon_params = [p for _, p in groups["muon"]]
        named["muon"] = Muon(
            muon_params,
            ns_dtype=ns_dtype_for(train_cfg.muon_ns_dtype, muon_params[0].device),
            lr=train_cfg.muon_learning_rate,
            weight_decay=train_cfg.weight_decay,
            momentum=train_cfg.muon_momentum,
            nesterov=True,
            adjust_lr_fn=train_cfg.muon_adjust_lr,
        )
    if adam_groups:
        named["adamw"] = torch.optim.AdamW(
            adam_groups, lr=train_cfg.learning_rate, betas=tuple(train_cfg.betas), eps=train_cfg.adam_eps
        )
    if not named:
        raise ValueError("the model has no trainable parameters")
    return Optimizers(named)


def make_lr_lambda(train_cfg, multiplier: Callable[[int], float] | None = None) -> Callable[[int], float]:
    """LambdaLR factor: warmup + cosine to ``min_lr_ratio`` (see module docstring), times
    ``multiplier(step)`` (the saddle boost). A plain function on purpose: LambdaLR's state_dict skips
    functions, so the (stateful) multiplier is checkpointed by its owner, not pickled in here."""
    warmup = int(train_cfg.warmup_steps)
    total = int(train_cfg.max_steps)
    r = float(train_cfg.min_lr_ratio)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            f = (step + 1) / warmup
        else:
            span = max(1, total - warmup)
            progress = min(1.0, (step - warmup) / span)
            f = r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return f * (multiplier(step) if multiplier is not None else 1.0)

    return lr_lambda


class Schedulers(list):
    """One LambdaLR per optimizer, stepped and checkpointed together (state_dict keyed by name)."""

    def __init__(self, optimizers: Optimizers, lr_lambda: Callable[[int], float]):
        super().__init__(LambdaLR(opt, lr_lambda) for opt in optimizers)
        self.names = list(optimizers.names)

    def step(self) -> None:
        for s in self:
            s.step()

    @property
    def last_epoch(self) -> int:
        """Steps taken (the schedule's position), as ``LambdaLR.last_epoch``."""
        return self[0].last_epoch

    def get_last_lr(self) -> dict[str, list[float]]:
        return {name: s.get_last_lr() for name, s in zip(self.names, self)}

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in zip(self.names, self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError(f"scheduler state holds {sorted(state)} but this run builds {sorted(self.names)}")
        for name, s in zip(self.names, self):
            s.load_state_dict(state[name])


def build_schedulers(optimizers: Optimizers, train_cfg, multiplier: Callable[[int], float] | None = None) -> Schedulers:
    """LambdaLR(make_lr_lambda(train_cfg, multiplier)) for every optimizer.

    Order in a training step: ``optimizers.step()``; ``saddle.update(step, loss, grad_norm)``;
    ``schedulers.step()`` (so a boost decided at step s applies from step s + 1 on)."""
    return Schedulers(optimizers, make_lr_lambda(train_cfg, multiplier))
