"""Segment reductions over packed sequences described by ``cu_seqlens``.

Every helper is vectorised: per-sequence reductions use ``index_add`` on segment ids built with
``torch.repeat_interleave`` of the sequence lengths, never a Python loop over tokens or sequences.

Shapes: T: packed tokens, N: sequences, S: longest sequence (padded view), G: groups.
"""

from __future__ import annotations

import torch

__all__ = [
    "seq_lens",
    "seq_ids",
    "token_positions",
    "segment_sum",
    "segment_mean",
    "to_padded",
    "from_padded",
    "masked_mean",
    "group_index",
]


def seq_lens(cu_seqlens_N1: torch.Tensor) -> torch.Tensor:
    """Lengths [N] (int64) from cumulative lengths [N+1]."""
    return cu_seqlens_N1.diff().long()


def seq_ids(cu_seqlens_N1: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Sequence index of every packed token, [T] int64."""
    lens_N = seq_lens(cu_seqlens_N1)
    idx_N = torch.arange(lens_N.numel(), device=cu_seqlens_N1.device)
    return torch.repeat_interleave(idx_N, lens_N, output_size=num_tokens)


def token_positions(cu_seqlens_N1: torch.Tensor, seq_ids_T: torch.Tensor | None = None) -> torch.Tensor:
    """Position of every packed token inside its own sequence, [T] int64."""
    if seq_ids_T is None:
        seq_ids_T = seq_ids(cu_seqlens_N1)
    starts_T = cu_seqlens_N1.long()[:-1][seq_ids_T]
    return torch.arange(seq_ids_T.numel(), device=seq_ids_T.device) - starts_T


def segment_sum(x_T: torch.Tensor, seq_ids_T: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Sum of ``x_T`` over each segment, [N]; differentiable, empty segments give 0."""
    return x_T.new_zeros(num_seqs).index_add(0, seq_ids_T, x_T)


def segment_mean(x_T: torch.Tensor, w_T: torch.Tensor, seq_ids_T: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Weighted mean of ``x_T`` per segment, [N]; a segment with zero total weight gives 0 (not NaN)."""
    num_N = segment_sum(x_T * w_T, seq_ids_T, num_seqs)
    den_N = segment_sum(w_T.to(x_T.dtype), seq_ids_T, num_seqs)
    return num_N / den_N.clamp(min=1e-30) * (den_N > 0)


def to_padded(x_T: torch.Tensor, cu_seqlens_N1: torch.Tensor, max_len: int | None = None,
              fill: float = 0.0) -> torch.Tensor:
    """Scatter packed ``x_T`` into a right-padded [N, S] view."""
    ids_T = seq_ids(cu_seqlens_N1, x_T.numel())
    pos_T = token_positions(cu_seqlens_N1, ids_T)
    num_seqs = cu_seqlens_N1.numel() - 1
    if max_len is None:
        max_len = int(seq_lens(cu_seqlens_N1).max().item()) if num_seqs > 0 else 0
    out_NS = x_T.new_full((num_seqs, max_len), fill)
    out_NS[ids_T, pos_T] = x_T
    return out_NS


def from_padded(x_NS: torch.Tensor, cu_seqlens_N1: torch.Tensor) -> torch.Tensor:
    """Gather a right-padded [N, S] view back to packed [T]."""
    ids_T = seq_ids(cu_seqlens_N1)
    return x_NS[ids_T, token_positions(cu_seqlens_N1, ids_T)]


def masked_mean(x_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Mean of ``x_T`` over ``mask_T``; 0 when the mask is empty."""
    w_T = mask_T.to(x_T.dtype)
    return (x_T * w_T).sum() / w_T.sum().clamp(min=1.0)


def group_index(group_ids_N: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index [N] in ``[0, G)`` for arbitrary integer group ids, and G."""
    uniq_G, inv_N = torch.unique(group_ids_N, return_inverse=True)
    return inv_N, uniq_G.numel()
