"""Data parallelism for the trainer, on torch.distributed as torchrun sets it up.

``torchrun --nproc-per-node N -m distill_dag.train --config ...`` runs the same trainer in N
processes (NCCL on GPUs, gloo on CPU). Each optimizer step consumes one GLOBAL batch of
``batch_size * world_size`` rows per micro-batch; rank r takes rows ``[r*batch_size, (r+1)*batch_size)``,
so the data order, and the loss, are those of a single process with the matching global batch.
Rank 0 alone logs and writes checkpoints; a checkpoint holds the unwrapped model and full optimizer
state, so it loads at any world size.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
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


class HiddenStates(torch.nn.Module):
    """The student as DDP sees it: forward returns the last hidden state [B, T, d]; the LM head and the
    loss run chunked outside (distill_loss), and their gradients still reach DDP's hooks."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    hidden = HiddenStates(model)
    if not info.enabled:
        return hidden
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(hidden, device_ids=[info.local_rank] if device.type == "cuda" else None)


def no_sync(wrapped: torch.nn.Module, last_micro_batch: bool) -> Any:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last_micro_batch or not hasattr(wrapped, "no_sync"):
        return nullcontext()
    return wrapped.no_sync()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
