"""Routed experts as 3-D weights (grouped SwiGLU) and the optional shared experts.

N: rows (tokens sorted by expert), D: model dim, I: expert inter dim, E: experts (local under EP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .grouped_mm import grouped_mm

__all__ = ["GroupedExperts", "SharedExperts", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (expert/tensor parallel), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class GroupedExperts(nn.Module):
    """E SwiGLU experts ``w2 @ (silu(w1 @ x) * (w3 @ x))`` stored as ``w1, w3: [E, I, D]``, ``w2: [E, D, I]``.

    ``forward`` takes tokens already sorted by expert and the rows per expert. Under expert parallel
    the parameters are DTensors sharded on dim 0 (and on I under expert-tensor parallel); the forward
    uses their local shards, so ``counts_E`` then covers the local experts only.
    """

    def __init__(self, num_experts: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, inter_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, inter_dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(w, std=std)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w1_EID, w3_EID, w2_EDI = (local_tensor(w) for w in (self.w1, self.w3, self.w2))
        if counts_E.shape[0] != w1_EID.shape[0]:
            raise ValueError(
                f"got counts for {counts_E.shape[0]} experts but {w1_EID.shape[0]} local experts"
            )
        h_NI = F.silu(grouped_mm(x_ND, w1_EID, counts_E)) * grouped_mm(x_ND, w3_EID, counts_E)
        return grouped_mm(h_NI, w2_EDI, counts_E)


class SharedExperts(nn.Module):
    """Always-on SwiGLU MLP (the shared experts fused into one MLP of width num * inter_dim)."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def reset_parameters(self, std: float = 0.02) -> None:
        for lin in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(lin.weight, std=std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))
