"""Global gradient-norm clipping across FSDP2 / TP / PP / EP, where parameters live on different meshes.

`torch.nn.utils.clip_grad_norm_` cannot stack DTensors from different meshes (dense params on the
dp x tp mesh, experts on the ep mesh), so the squared norm is computed per mesh, reduced as a plain
tensor, and summed. Every rank calls every collective even when it holds no gradient, so ranks whose
parameters are all frozen (e.g. LoRA) never hang.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _mesh_key(p: torch.Tensor):
    return p.device_mesh if isinstance(p, DTensor) else None


def grad_norm_sq(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm of the grads of `params` (fp32 scalar, identical on every rank of each mesh)."""
    by_mesh: dict = defaultdict(list)
    device = None
    for p in params:
        if p.grad is not None:
            by_mesh[_mesh_key(p)].append(p.grad)
            device = p.grad.device if not isinstance(p.grad, DTensor) else p.grad.to_local().device
    total = torch.zeros((), dtype=torch.float32, device=device or "cpu")
    for mesh, grads in by_mesh.items():
        if mesh is None:
            local = [g for g in grads]
            sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum()
            total = total + sq.to(total.device)
            continue
        # DTensor: sum of squares of local shards, reduced over the mesh dims where grads are sharded,
        # computed with DTensor ops so Partial / Shard placements are handled by DTensor itself.
        sq = None
        for g in grads:
            s = g.detach().float().pow(2).sum()
            s = s.full_tensor()
            sq = s if sq is None else sq + s
        total = total + sq.to(total.device)
    return total


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, *, pp_group=None,
                    extra_groups: Iterable = ()) -> torch.Tensor:
    """Clip grads in place to a global L2 norm of `max_norm`; returns the total norm (before clipping).

    `pp_group`: pipeline stages hold different parameters, so their squared norms are summed over it.
    A non-finite norm is returned as is and grads are left untouched (the caller skips the step).
    """
    params = [p for p in params if p.requires_grad]
    sq = grad_norm_sq(params)
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    for g in extra_groups:
        dist.all_reduce(sq, group=g)
    norm = sq.sqrt()
    if math.isfinite(max_norm) and torch.isfinite(norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                g = p.grad
                if isinstance(g, DTensor):
                    g.to_local().mul_(coef.to(g.to_local().device))
                else:
                    g.mul_(coef.to(g.device))
    return norm
