"""MoE parallel folding: expert parallel over ranks that attention uses for tensor parallel.

In the hybrid allocation form (``archon:(attn:d2t2|ffn:e4)``) the expert mesh re-splits a stage's ranks
as ``(edp, ep, etp)`` with no ``ep_rep`` axis, so one ep group may hold several ranks of one attention
tp group. Inside the MoE layer those ranks hold the same tokens (the plan's ``gather_scatter_seq``
all-gathers the sequence shards; with sequence parallel off the stream is replicated anyway). If each
of them dispatched all its rows, every (token, choice) row would reach its expert ``tp / etp`` times.

``FoldedExpertRunner`` wraps the expert-parallel runner: the ``fold = tp / etp`` ranks of a tp group
that share an etp index (the *fold group*; the whole tp group when etp = 1) cut the rows, already
sorted by expert, into ``fold`` contiguous slices; each dispatches its slice through the inner runner
and the results are all-gathered over the fold group. Every row is computed once, and every rank gets
all outputs back, so everything outside the runner (router, shared experts, aux loss, aux-free bias
load, combine) stays replicated over tp exactly as in the plain form. The price over feeding the MoE
its sequence-parallel shard directly is one all-gather of the expert outputs ``[N, D]`` over the fold
group; in exchange the router and shared-expert grads need no extra tp reduction.

Autograd follows the replicated convention of DTensor (upstream grads are identical on the fold
group, each a grad of one copy of the loss): the slice's backward all-gathers the slice grads, the
gather's backward keeps this rank's slice. Expert grads therefore sum each row once, as in the plain
form, and the expert grad scale ``edp / dp_cp`` is unchanged.

Under ETP (1 < etp < tp) the etp ranks of one slice hold the same rows, as ``ExpertParallelRunner``
requires; etp must divide tp because only the ranks of one attention tp group share tokens.

N: (token, choice) rows sorted by expert, D: model dim, E: experts (global), F: fold group size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .dims import ParallelDims, ParallelMeshes

__all__ = ["FoldedExpertRunner", "fold_expert_runner", "fold_mesh", "validate_folding"]


def validate_folding(dims: ParallelDims) -> None:
    """Reject hybrid expert layouts whose expert-tensor-parallel ranks would hold different tokens."""
    if not dims.hybrid or dims.etp == 1:
        return
    if not dims.ep_enabled:
        raise ValueError(f"hybrid allocation: ffn t{dims.etp} (expert tensor parallel) is only wired together "
                         f"with expert parallel; add e>1 to the ffn section (e.g. ffn:e2t{dims.etp}) or use ffn t1")
    if dims.tp % dims.etp != 0:
        valid = [d for d in range(1, dims.tp + 1) if dims.tp % d == 0]
        raise ValueError(f"hybrid allocation: ffn t{dims.etp} must divide attn t{dims.tp}: expert-tensor-parallel "
                         f"ranks must see the same tokens, and only the ranks of one attention tp group do; "
                         f"pick ffn t in {valid} and fold the remaining ranks into ffn e or d")


def fold_mesh(dims: ParallelDims, meshes: ParallelMeshes, device_type: str = "cpu"):
    """The 1-D mesh of a fold group (see module doc), or None when nothing folds (tp == etp).

    Call on every rank (it may create process groups). etp = 1: the tp mesh itself.
    """
    validate_folding(dims)
    if not dims.hybrid or dims.tp == dims.etp:
        return None
    if dims.etp == 1:
        return meshes["tp"]
    from torch.distributed.device_mesh import DeviceMesh

    fold = dims.tp // dims.etp
    ranks = torch.arange(dims.world_size).view(-1, fold, dims.etp)  # tp (innermost) = (fold, etp)
    return DeviceMesh(device_type, ranks, mesh_dim_names=("fold_outer", "fold", "fold_etp"))["fold"]


def _split(num_rows: int, parts: int) -> list[int]:
    base, extra = divmod(num_rows, parts)
    return [base + (i < extra) for i in range(parts)]


def _all_gather_rows(x_nD: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's rows (rank i holds ``sizes[i]``); pads to equal size for the collective."""
    most = max(sizes)
    x_pad = x_nD.new_zeros(most, *x_nD.shape[1:])
    x_pad[: x_nD.shape[0]] = x_nD
    parts = [torch.empty_like(x_pad) for _ in sizes]
    dist.all_gather(parts, x_pad, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _SliceRows(torch.autograd.Function):
    """Keep rows ``[lo, hi)`` of a fold-replicated tensor; backward all-gathers the slices' grads."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, lo: int, hi: int, sizes: list[int], group: dist.ProcessGroup):
        ctx.sizes, ctx.group = sizes, group
        return x_ND[lo:hi].contiguous()

    @staticmethod
    def backward(ctx, g_nD: torch.Tensor):
        return _all_gather_rows(g_nD.contiguous(), ctx.sizes, ctx.group), None, None, None, None


class _GatherRows(torch.autograd.Function):
    """All-gather row slices into the fold-replicated tensor; backward keeps this rank's rows."""

    @staticmethod
    def forward(ctx, y_nD: torch.Tensor, lo: int, hi: int, sizes: list[int], group: dist.ProcessGroup):
        ctx.lo, ctx.hi = lo, hi
        return _all_gather_rows(y_nD.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        return g_ND[ctx.lo : ctx.hi].contiguous(), None, None, None, None


def _slice_counts(counts_E: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows of each expert inside ``[lo, hi)`` of the expert-sorted rows (on device, no host sync)."""
    end_E = counts_E.cumsum(0)
    start_E = end_E - counts_E
    return (end_E.clamp(max=hi) - start_E.clamp(min=lo)).clamp_min(0)


class FoldedExpertRunner:
    """Runs ``inner`` (an ``ExpertRunner``, usually ``ExpertParallelRunner``) on this rank's slice of the
    fold-replicated rows and all-gathers the outputs over ``fold_group`` (see module doc)."""

    def __init__(self, inner, fold_group: dist.ProcessGroup) -> None:
        self.inner = inner
        self.fold_group = fold_group
        self.fold = dist.get_world_size(fold_group)
        self.fold_rank = dist.get_rank(fold_group)

    def __repr__(self) -> str:
        return f"FoldedExpertRunner({self.inner!r}, fold={self.fold})"

    def __call__(self, experts: nn.Module, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        sizes = _split(x_ND.shape[0], self.fold)
        lo = sum(sizes[: self.fold_rank])
        hi = lo + sizes[self.fold_rank]
        x_mine_nD = _SliceRows.apply(x_ND, lo, hi, sizes, self.fold_group)
        y_mine_nD = self.inner(experts, x_mine_nD, _slice_counts(counts_E, lo, hi))
        return _GatherRows.apply(y_mine_nD, lo, hi, sizes, self.fold_group)


def fold_expert_runner(moe: nn.Module, fold_group: dist.ProcessGroup) -> nn.Module:
    """Wrap ``moe.expert_runner`` (installed by ``apply_expert_parallel``) in a ``FoldedExpertRunner``."""
    if isinstance(moe.expert_runner, FoldedExpertRunner):
        raise ValueError("the MoE layer's expert runner is already folded; fold it once, after expert parallel")
    moe.expert_runner = FoldedExpertRunner(moe.expert_runner, fold_group)
    return moe
