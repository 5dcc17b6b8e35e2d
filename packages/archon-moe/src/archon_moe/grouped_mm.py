"""Grouped GEMM over contiguous token groups: the one place that touches `grouped_mm` kernels.

N: rows (tokens sorted by group), E: groups (experts), I: in features, O: out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm", "grouped_mm_reference", "uses_grouped_kernel"]

# torch >= 2.10 exposes the public `F.grouped_mm`; torch 2.9 / 2.11 images may only have the private
# `torch._grouped_mm` (same semantics). Neither is used on CPU: the fp32 backward of `_grouped_mm`
# fails there, and the per-group loop below gives the same numbers.
_KERNEL = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def uses_grouped_kernel(x_NI: torch.Tensor) -> bool:
    """True when `grouped_mm` runs the fused CUDA kernel for this input (bf16 on CUDA)."""
    return _KERNEL is not None and x_NI.is_cuda and x_NI.dtype == torch.bfloat16


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of group e] = x[rows of group e] @ w[e].T``; groups are contiguous row blocks.

    ``counts_E`` (int, on x's device) holds the rows of each group and must sum to N. On CUDA in bf16
    this is one kernel with device-side offsets (no host sync, no alignment padding needed: the
    kernel accepts any group size, including 0). Elsewhere it loops over groups, which reads the
    counts on the host (free on CPU; one sync on CUDA in non-bf16 dtypes).
    """
    if _KERNEL is not None and uses_grouped_kernel(x_NI):
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        return _KERNEL(x_NI, w_EOI.to(x_NI.dtype).transpose(-2, -1), offs=offsets_E)
    return grouped_mm_reference(x_NI, w_EOI, counts_E)


def grouped_mm_reference(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Per-group loop of plain matmuls; the CPU path and the reference for the CUDA kernel."""
    if w_EOI.shape[0] != counts_E.shape[0]:
        raise ValueError(f"got {w_EOI.shape[0]} weight groups but {counts_E.shape[0]} group counts")
    chunks = torch.split(x_NI, counts_E.tolist(), dim=0)
    outs = [x_nI @ w_EOI[e].to(x_nI.dtype).t() for e, x_nI in enumerate(chunks)]
    if not outs:
        return x_NI.new_empty(0, w_EOI.shape[1])
    return torch.cat(outs, dim=0)
