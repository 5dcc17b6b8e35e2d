"""Keep FSDP2 parameters gathered while DTA walks a tree.

DTA runs a data-dependent number of forwards and backwards per micro-batch, so with per-call
all-gathers and reduce-scatters the DP ranks would issue different collectives and hang. Instead every
FSDP unit is gathered once (by the first forward, which every rank runs) and kept gathered, gradients
accumulate unsharded without communication, and one reduce-scatter per unit runs in the micro-batch's
last backward. Memory while walking: unsharded parameters and gradients (like ZeRO-1), not more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.distributed.fsdp import FSDPModule


def _reshard_after_forward(module: FSDPModule) -> bool:
    # FSDP2 has no public getter for reshard_after_forward (torch 2.11-2.15): read whether the param
    # groups have a post-forward mesh; if the private layout changes, fall back to FSDP2's default (True).
    try:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            groups = [state._fsdp_param_group]
        return any(g is not None and g.post_forward_mesh_info is not None for g in groups)
    except AttributeError:
        return True


class FsdpHold:
    """Handle given by :func:`hold_unsharded`; call :meth:`before_last_backward` right before the
    micro-batch's last backward so it reduce-scatters the accumulated gradients."""

    def __init__(self, modules: list[FSDPModule]) -> None:
        self.modules = modules

    def before_last_backward(self) -> None:
        for m in self.modules:
            m.set_requires_gradient_sync(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)


@contextmanager
def hold_unsharded(model: nn.Module) -> Iterator[FsdpHold]:
    """Inside: no resharding and no gradient sync for any FSDP unit of ``model`` (a no-op without FSDP)."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    saved = [_reshard_after_forward(m) for m in modules]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield FsdpHold(modules)
    finally:
        for m, reshard in zip(modules, saved):
            m.set_reshard_after_forward(reshard, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
            m.set_requires_gradient_sync(True, recurse=False)
            m.reshard()
