"""Data parallelism for the trainer, on torch.distributed as torchrun sets it up.

``torchrun --standalone --nproc-per-node N -m distill_dag.train --config ...`` runs the same trainer in
N processes (NCCL on GPUs, gloo on CPU). Each optimizer step consumes one GLOBAL batch of
``batch_size * world_size`` rows per micro-batch; rank r takes rows ``[r*batch_size, (r+1)*batch_size)``,
so the data order, and the loss, are those of a single process with the matching global batch.

``train.parallel`` picks how the student is spread over the ranks:
- ``ddp``: every rank holds the whole student; gradients are all-reduced (DistributedDataParallel).
- ``fsdp``: parameters, gradients and optimizer state are sharded (FSDP2 ``fully_shard``: each RetNet
  block, then the root), for students that do not fit one GPU. Muon still sees whole matrices: its
  Newton-Schulz runs on DTensors, which gather what each product needs.
Either way the loss (chunked LM head included) runs inside the wrapped module's forward
(:class:`StudentLoss`), so FSDP has the LM head's weight unsharded when it is used. Rank 0 alone logs
and writes checkpoints; a checkpoint holds the full (unsharded) model and the optimizer state keyed by
parameter name, so it loads at any world size and in either mode.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from distill_dag.loss.kd import distill_loss


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.enabled and self.parallel == "fsdp"


def init_distributed(device_type: str, parallel: str = "ddp", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process).

    ``timeout_s`` bounds every collective: a rank that died or hangs turns into an error on the others
    instead of a job that waits forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(parallel=parallel)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), parallel)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def local_rows(batch: dict[str, torch.Tensor], info: DistInfo, batch_size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a global micro-batch of ``batch_size * world_size`` rows."""
    if not info.enabled:
        return batch
    lo, hi = info.rank * batch_size, (info.rank + 1) * batch_size
    return {k: v[lo:hi] for k, v in batch.items()}


class StudentLoss(torch.nn.Module):
    """The student as DDP/FSDP see it: forward = RetNet body + chunked LM head + loss
    (:func:`distill_dag.loss.kd.distill_loss`), returning its ``LossOutput``. Full logits
    [B, T, V] are never materialised; under FSDP the LM head's weight is gathered for this forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], teacher: Any = None, **loss_kw: Any) -> Any:
        hidden = self.model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).last_hidden_state
        return distill_loss(hidden, self.model.get_output_embeddings().weight, batch["labels"], teacher, **loss_kw)


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``StudentLoss(model)``, under DDP or FSDP2 when there are several ranks. Build the optimizers
    AFTER this: ``fully_shard`` replaces the parameters with sharded ones."""
    module = StudentLoss(model)
    if not info.enabled:
        return module
    if info.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        for block in model.model.layers:  # one all-gather per block, freed after its forward/backward
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)  # embeddings, final norm and the (tied) LM head
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[info.local_rank] if device.type == "cuda" else None)


def no_sync(wrapped: torch.nn.Module, last_micro_batch: bool) -> Any:
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last micro-batch."""
    if last_micro_batch:
        return nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: accumulate unsharded grads locally
        return _fsdp_no_sync(wrapped)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_grad_norm(params: torch.nn.Module | list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of ``params`` (a module, or a list of parameters; over all shards
    under FSDP) to ``max_norm`` and return the norm before clipping. ``max_norm <= 0``: measure only."""
    params = list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def full_state_options() -> Any:
    """State dicts of whole tensors (gathered from the shards under FSDP), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 under FSDP (every rank must call it: it gathers the
    shards); None otherwise (the model itself holds whole tensors)."""
    if not info.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=full_state_options())
    # a tied weight (LM head = embeddings) is listed under both names; keep the name save_pretrained
    # keeps (named_parameters lists a shared parameter once, under its first name)
    aliases = set(model.state_dict()) - {n for n, _ in model.named_parameters()} - {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k not in aliases}


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
