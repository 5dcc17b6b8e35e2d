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


class _GatherRows(torch.autograd.Function):
    """``x[index_N]`` where every source row is read exactly ``fan_out`` times. The backward gathers with
    the inverse map and sums the copies, instead of index_select's atomic index_add (slow in bf16 and
    non-deterministic on CUDA)."""

    @staticmethod
    def forward(ctx, x_SD: torch.Tensor, index_N: torch.Tensor, inverse_N: torch.Tensor, fan_out: int):
        ctx.save_for_backward(inverse_N)
        ctx.fan_out = fan_out
        return x_SD.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        grad_flat_ND = grad_ND.index_select(0, inverse_N)
        if ctx.fan_out > 1:
            grad_flat_ND = grad_flat_ND.view(
                grad_flat_ND.shape[0] // ctx.fan_out, ctx.fan_out, grad_ND.shape[-1]
            ).sum(dim=1)
        return grad_flat_ND, None, None, None


def permute_by_expert(
    x_TD: torch.Tensor, experts_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather one row per (token, choice), sorted by expert id (stable: token order within an expert).

    Returns ``x_ND``, ``order_N`` (the flat token * K + choice index of each sorted row) and its inverse
    ``inverse_N`` (the sorted position of each flat index); no host sync.
    """
    top_k = experts_TK.shape[1]
    order_N = torch.argsort(experts_TK.reshape(-1), stable=True)
    inverse_N = torch.empty_like(order_N).scatter_(
        0, order_N, torch.arange(order_N.numel(), device=order_N.device)
    )
    return _GatherRows.apply(x_TD, order_N // top_k, inverse_N, top_k), order_N, inverse_N


def unpermute_and_combine(
    y_ND: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """Bring expert outputs back to (token, choice) order and take the weighted sum over choices."""
    num_tokens, top_k = weights_TK.shape
    y_TKD = _GatherRows.apply(y_ND, inverse_N, order_N, 1).view(num_tokens, top_k, y_ND.shape[-1])
    return torch.bmm(weights_TK.unsqueeze(1).to(y_TKD.dtype), y_TKD).squeeze(1)
