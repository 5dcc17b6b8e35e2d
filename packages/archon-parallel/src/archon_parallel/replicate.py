"""Full model replicas on every data-parallel rank: sum their gradients with bucketed all-reduces.

The replicated layout (AReaL's: every rank holds the whole model, the optimizer state is ZeRO-1 sharded)
needs no wrapping of the model; after the last backward of a step, :func:`all_reduce_grads` sums the
ranks' gradients in place. There is no overlap with backward on purpose: runners such as DTA issue a
data-dependent number of backwards per rank, so per-backward hooks would issue different collectives on
different ranks. One sync after the step's backwards is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["all_reduce_grads"]

DEFAULT_BUCKET_NUMEL = 1 << 25
"""Elements per all-reduce bucket (128 MiB of fp32); one bucket's copy is the extra memory."""


def _grads_with_agreement(params: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Grads of `params` that some rank holds; a rank without one uses zeros so every rank's buckets match.
    A parameter no rank has a gradient for keeps `grad=None` (the optimizer skips it, as single-process)."""
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, group=group)
    grads = []
    for p, any_rank in zip(params, has_grad.tolist()):
        if not any_rank:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads


@torch.no_grad()
def all_reduce_grads(params: Iterable[torch.Tensor], group=None, *, bucket_numel: int = DEFAULT_BUCKET_NUMEL
                     ) -> None:
    """Sum the gradients of replicated `params` over `group` in place (no averaging: the caller's loss
    scale decides the normalisation). Collective: every rank of `group` must call it with the same params."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    params = [p for p in params if p.requires_grad]
    if not params or dist.get_world_size(group) == 1:
        return
    for p in params:
        if hasattr(p, "device_mesh"):
            raise ValueError(f"all_reduce_grads sums plain replicated tensors; got a DTensor on {p.device_mesh} "
                             "(sharded parameters reduce their gradients through FSDP / DTensor)")
    bucket: list[torch.Tensor] = []
    numel = 0
    for g in _grads_with_agreement(params, group):
        if bucket and (numel + g.numel() > bucket_numel or g.dtype != bucket[0].dtype
                       or g.device != bucket[0].device):
            _reduce_bucket(bucket, group)
            bucket, numel = [], 0
        bucket.append(g)
        numel += g.numel()
    if bucket:
        _reduce_bucket(bucket, group)


def _reduce_bucket(grads: list[torch.Tensor], group) -> None:
    if len(grads) == 1 and grads[0].is_contiguous():
        dist.all_reduce(grads[0], group=group)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
