"""Token permute/unpermute by sort, and the expert-runner strategy the MoE layer calls.

T: tokens, D: model dim, K: top-k, E: experts, N = T * K: (token, choice) rows sorted by expert.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["ExpertRunner", "LocalExpertRunner", "permute_by_expert", "unpermute_and_combine"]


class ExpertRunner(Protocol):
    """Runs ``experts`` on rows sorted by global expert id (``counts_E`` rows each) and returns their
    outputs in the same order. The local runner calls the experts directly; the expert-parallel one
    (``archon_parallel.expert_parallel``) moves the rows to the ranks that own the experts and back."""

    def __call__(self, experts: nn.Module, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor: ...


class LocalExpertRunner:
    """All experts live on this rank."""

    def __call__(self, experts: nn.Module, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return experts(x_ND, counts_E)

    def __repr__(self) -> str:
        return "LocalExpertRunner()"


def permute_by_expert(x_TD: torch.Tensor, experts_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather one row per (token, choice), sorted by expert id (stable: token order within an expert).

    Returns ``x_ND`` and ``order_N``, the flat (token * K + choice) index of each sorted row; no host sync.
    """
    top_k = experts_TK.shape[1]
    order_N = torch.argsort(experts_TK.reshape(-1), stable=True)
    return x_TD.index_select(0, order_N // top_k), order_N


def unpermute_and_combine(y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Scatter expert outputs back to (token, choice) order and take the weighted sum over choices."""
    num_tokens, top_k = weights_TK.shape
    y_flat_ND = torch.empty_like(y_ND).index_copy(0, order_N, y_ND)
    y_TKD = y_flat_ND.view(num_tokens, top_k, -1)
    return (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)
