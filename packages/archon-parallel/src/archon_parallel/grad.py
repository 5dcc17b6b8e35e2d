"""Global gradient-norm clipping across FSDP2 / TP / PP / EP, where parameters live on different meshes.

`torch.nn.utils.clip_grad_norm_` cannot stack DTensors from different meshes (dense params on the
dp x tp mesh, experts on the ep mesh), so the squared norm is computed per (mesh, placements) group with
foreach kernels, all-reduced once per sharded mesh dim as a plain tensor, and summed. Every rank calls every collective even when it holds no gradient, so ranks whose
parameters are all frozen (e.g. LoRA) never hang.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def _local_sq(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of the local tensors, with foreach kernels (one launch per ~hundred grads)."""
    return torch.nn.utils.get_total_norm([_local(g).detach() for g in grads], 2.0, foreach=None).float() ** 2


def grad_norm_sq(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm of the grads of `params` (fp32 scalar, identical on every rank of each mesh).

    Grads are grouped by (mesh, placements): each group's local squares are summed on device, then
    all-reduced once over every mesh dim the group is sharded on (replicated dims hold equal values).
    Partial grads (never produced by FSDP2/TP backward, but possible) fall back to DTensor's own reduction.
    """
    groups: dict = defaultdict(list)
    device = None
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups[key].append(g)
            device = _local(g).device
    total = torch.zeros((), dtype=torch.float32, device=device or "cpu")
    for key, grads in groups.items():
        if key is not None and any(pl.is_partial() for pl in key[1]):
            for g in grads:
                total = total + g.detach().float().pow(2).sum().full_tensor().to(total.device)
            continue
        sq = _local_sq(grads).to(total.device)
        if key is not None:
            mesh, placements = key
            for dim, pl in enumerate(placements):
                if not pl.is_replicate():  # Shard and FSDP+TP's _StridedShard (whose is_shard() is False)
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total + sq
    return total


def _scale_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """In-place multiply by a device scalar; torch._foreach_mul_ where present (one launch per group)."""
    foreach_mul = getattr(torch, "_foreach_mul_", None)
    by_device: dict = defaultdict(list)
    for t in tensors:
        by_device[(t.device, t.dtype)].append(t)
    for (dev, _), ts in by_device.items():
        c = coef.to(dev)
        if foreach_mul is not None:
            foreach_mul(ts, c)
        else:
            for t in ts:
                t.mul_(c)


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
    if math.isfinite(max_norm):
        # No host read of the norm (it would stall the CPU until backward ends): a non-finite norm gives
        # coefficient 1, leaving the grads as they are.
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
        _scale_([_local(p.grad) for p in params if p.grad is not None], coef)
    return norm
