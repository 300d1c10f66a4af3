"""KD loss kernels: chunked fused-linear sparse top-k KL + CE (PyTorch, optional Triton tail on CUDA)
and the naive full-vocabulary reference they are tested and benchmarked against."""

from .chunked import TAILS, KDOptions, fused_linear_kd_loss
from .reference import reference_distill_loss

__all__ = ["TAILS", "KDOptions", "fused_linear_kd_loss", "reference_distill_loss"]
