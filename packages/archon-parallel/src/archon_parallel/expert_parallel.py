"""Expert parallel (EP) and expert-tensor parallel (ETP) for MoE layers.

Experts are sharded on dim 0 over the ``ep`` mesh; each rank routes its own tokens, sends every
(token, choice) row to the rank that owns its expert with an uneven all-to-all, runs its local
experts, and sends the results back. The MoE layer only has to expose ``experts`` (a module with
3-D parameters ``w1``/``w3`` [E, I, D] and ``w2`` [E, D, I], called as ``experts(x_ND, counts_E)``)
and an ``expert_runner`` attribute (called as ``runner(experts, x_ND, counts_E)`` on rows sorted by
global expert id); ``archon_moe.MoE`` does, so this module does not import archon-moe.

ETP on an ``[ep, tp]`` mesh:
- etp = 1 (``etp_mesh=None``): experts are replicated over tp. The MoE input is replicated over tp
  (the attention block's row-parallel output is all-reduced), so every tp rank routes the same tokens
  identically and runs the same EP exchange inside its own ep group; expert grads come out identical
  on every tp rank, so no tp reduction is needed. The price is tp-fold redundant expert compute; use
  etp = tp (or a larger ep) when that matters.
- etp = tp (``etp_mesh=tp_mesh``): w1/w3 are column-sharded (dim 1, I) and w2 row-sharded (dim 2, I)
  over tp. The tokens are again identical on every tp rank; the expert input passes through
  ``copy_to_tp`` (backward: all-reduce the partial input grads) and the partial expert outputs through
  ``reduce_from_tp`` (forward: all-reduce) before they travel back, so the routing weights and
  everything after see full values.

Gradient placement: expert parameters are DTensors on the ep (x tp) mesh and are NOT data parallel
over ep: each expert's grad already sums the contributions of every ep rank's tokens. Shard them with
FSDP over the expert-data-parallel (``edp``) mesh, not over dp. The router gate, shared experts and
the rest of the model stay data parallel over ep (their grads need the usual dp reduction).

Host sync: one per MoE layer forward (and none extra in backward): the split sizes of the token
all-to-all are read on the host after a small all-to-all of per-expert counts. Under torch.compile
this is a data-dependent point (graph break unless ``capture_scalar_outputs``).

N: (token, choice) rows, D: model dim, E: experts (global), L: local experts, P: ep ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

__all__ = [
    "ExpertParallelRunner",
    "apply_expert_parallel",
    "all_to_all_autograd",
    "copy_to_tp",
    "reduce_from_tp",
]

try:  # traceable by torch.compile; private module (stable since torch 2.3)
    from torch.distributed._functional_collectives import all_to_all_single_autograd as _funcol_a2a
except ImportError:  # pragma: no cover - older torch
    _funcol_a2a = None


def all_to_all_autograd(
    x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Uneven all-to-all of rows with autograd (backward: the reverse all-to-all).

    The one place that calls a collective with autograd: the functional-collectives variant traces
    under torch.compile; the public ``torch.distributed.nn.functional`` one is the fallback.
    """
    if _funcol_a2a is not None:
        out = _funcol_a2a(x_ND.contiguous(), output_splits, input_splits, group)
        # AsyncCollectiveTensor: wait here so later in-place/index ops see the data.
        return out.wait() if hasattr(out, "wait") else out
    from torch.distributed.nn.functional import all_to_all_single

    out = x_ND.new_empty(sum(output_splits), *x_ND.shape[1:])
    return all_to_all_single(out, x_ND.contiguous(), output_splits, input_splits, group=group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward; all-reduce of the (partial) grads over tp in backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce of partial results over tp in forward; identity backward (grads are replicated)."""
    return _ReduceFromTP.apply(x, group)


def _expert_major_order(recv_counts_PL: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Permutation from received order (source rank, local expert) to (local expert, source rank)."""
    num_ranks, num_local = recv_counts_PL.shape
    segment_ids = torch.arange(num_ranks * num_local, device=recv_counts_PL.device)
    segment_N = torch.repeat_interleave(segment_ids, recv_counts_PL.reshape(-1), output_size=num_rows)
    key_N = (segment_N % num_local) * num_ranks + segment_N // num_local
    return torch.argsort(key_N, stable=True)


class ExpertParallelRunner:
    """Runs the local experts on rows gathered from every rank of ``ep_group`` (``ExpertRunner``)."""

    def __init__(self, ep_group: dist.ProcessGroup, etp_group: dist.ProcessGroup | None = None) -> None:
        self.ep_group = ep_group
        self.etp_group = etp_group
        self.ep_size = dist.get_world_size(ep_group)

    def __repr__(self) -> str:
        etp = dist.get_world_size(self.etp_group) if self.etp_group is not None else 1
        return f"ExpertParallelRunner(ep={self.ep_size}, etp={etp})"

    def __call__(self, experts: nn.Module, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        num_experts = counts_E.shape[0]
        num_local = num_experts // self.ep_size
        if self.etp_group is not None:
            x_ND = copy_to_tp(x_ND, self.etp_group)
        counts_PL = counts_E.view(self.ep_size, num_local)
        recv_counts_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_counts_PL, counts_PL, group=self.ep_group)
        # The one host sync: split sizes must be Python ints for the token all-to-all.
        input_splits, output_splits = torch.stack([counts_PL.sum(1), recv_counts_PL.sum(1)]).tolist()
        num_recv = sum(output_splits)

        x_recv_ND = all_to_all_autograd(x_ND, output_splits, input_splits, self.ep_group)
        order_N = _expert_major_order(recv_counts_PL, num_recv)
        # Permute with index_copy both ways (row j of the expert-major block is received row order_N[j]):
        # its backward is a gather, where index_select's backward would be an atomic index_add.
        inverse_N = torch.empty_like(order_N).scatter_(
            0, order_N, torch.arange(num_recv, device=order_N.device)
        )
        x_local_ND = torch.empty_like(x_recv_ND).index_copy(0, inverse_N, x_recv_ND)
        y_local_ND = experts(x_local_ND, recv_counts_PL.sum(0))
        if self.etp_group is not None:
            y_local_ND = reduce_from_tp(y_local_ND, self.etp_group)
        y_recv_ND = torch.empty_like(y_local_ND).index_copy(0, order_N, y_local_ND)
        return all_to_all_autograd(y_recv_ND, input_splits, output_splits, self.ep_group)


def _joint_mesh(ep_mesh: DeviceMesh, etp_mesh: DeviceMesh) -> DeviceMesh:
    ep_name, etp_name = (ep_mesh.mesh_dim_names or (None,))[0], (etp_mesh.mesh_dim_names or (None,))[0]
    root = ep_mesh._get_root_mesh()  # private; stable 2.4..2.15. Slicing the root by names is public.
    if ep_name is None or etp_name is None or root is not etp_mesh._get_root_mesh():
        raise ValueError(
            "expert-tensor parallel needs ep_mesh and etp_mesh to be named 1-D slices of one DeviceMesh, "
            "e.g. mesh['ep'] and mesh['tp']"
        )
    return root[(ep_name, etp_name)]


def _shard_locally(full: torch.Tensor, mesh: DeviceMesh, placements: tuple) -> DTensor:
    # src_data_rank=None: every rank keeps its own slice of the full tensor it holds, with no
    # communication (works on meta tensors; ranks must hold identical weights, as after a seeded init
    # or before loading). The keyword exists since torch 2.6; older versions scatter from rank 0.
    try:
        return distribute_tensor(full, mesh, placements, src_data_rank=None)
    except TypeError:  # pragma: no cover - torch < 2.6
        return distribute_tensor(full, mesh, placements)


def apply_expert_parallel(
    moe: nn.Module, ep_mesh: DeviceMesh, etp_mesh: DeviceMesh | None = None
) -> nn.Module:
    """Shard ``moe.experts`` over ``ep_mesh`` (dim 0) and, if ``etp_mesh`` is given, over it on the
    expert inter dim; install the all-to-all runner. Call on real or meta parameters before FSDP.

    Placements: w1/w3 [E, I, D] -> (Shard(0), Shard(1)), w2 [E, D, I] -> (Shard(0), Shard(2)) on the
    [ep, etp] mesh; (Shard(0),) on the ep mesh without etp. The router and shared experts are untouched
    (replicated: leave them to data parallel / FSDP like any dense parameter).
    """
    experts = getattr(moe, "experts", None)
    if experts is None or not hasattr(moe, "expert_runner"):
        raise TypeError(
            f"apply_expert_parallel needs an MoE module with .experts and .expert_runner, got {type(moe)}"
        )
    if ep_mesh.ndim != 1 or (etp_mesh is not None and etp_mesh.ndim != 1):
        raise ValueError("ep_mesh and etp_mesh must be 1-D device meshes")
    ep = ep_mesh.size()
    num_experts = experts.w1.shape[0]
    if num_experts % ep:
        raise ValueError(
            f"ep size {ep} must divide the number of experts {num_experts}; pick ep in "
            f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
        )
    shard_in: tuple[Shard, ...]
    shard_out: tuple[Shard, ...]
    if etp_mesh is None:
        mesh, shard_in, shard_out = ep_mesh, (Shard(0),), (Shard(0),)
    else:
        tp = etp_mesh.size()
        inter = experts.w1.shape[1]
        if inter % tp:
            raise ValueError(f"etp size {tp} must divide the expert inter dim {inter}")
        mesh, shard_in, shard_out = _joint_mesh(ep_mesh, etp_mesh), (Shard(0), Shard(1)), (Shard(0), Shard(2))
    for name, placements in (("w1", shard_in), ("w3", shard_in), ("w2", shard_out)):
        param = getattr(experts, name)
        if isinstance(param, DTensor):
            raise ValueError(f"experts.{name} is already a DTensor; apply expert parallel once, before FSDP")
        dt = _shard_locally(param.data, mesh, placements)
        setattr(experts, name, nn.Parameter(dt, requires_grad=param.requires_grad))
    moe.expert_runner = ExpertParallelRunner(
        ep_mesh.get_group(), None if etp_mesh is None else etp_mesh.get_group()
    )
    return moe
