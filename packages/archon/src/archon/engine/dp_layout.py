"""How the data-parallel ranks hold the model: a `DataParallelLayout` strategy, chosen once from the config.

`FsdpLayout` (`actor.archon.dp_layout: fsdp`, the default) shards parameters, gradients and optimizer state
with FSDP2 over the data-parallel ranks (and applies every other parallel style through
`archon_parallel.parallelize`). `Zero1Layout` (`dp_layout: zero1`) keeps a full model replica on every rank,
sums gradients with one bucketed all-reduce per step and shards only the AdamW state (ZeRO-1, see
`archon.engine.zero1`). The engine, the checkpointer and offload ask the layout; none of them asks which
layout it holds.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from archon.engine.optim import adamw_kwargs, param_groups
from torch import nn

Held = list[tuple[torch.Tensor, torch.Tensor]]


class DataParallelLayout(Protocol):
    """What differs between data-parallel layouts, for the model builder and the engine."""

    def wrap(self, model: nn.Module, dims, plan, *, device_type: str, ac: str, compile, fsdp, **hooks: Any) -> None:
        """Apply the parallel styles, activation checkpointing and compile to the meta model, in place."""

    def build_optimizer(self, model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters of `model` (`cfg`: the OptimizerConfig)."""

    def loss_scale_world(self) -> int:
        """Factor each rank's loss is multiplied by so the gradient reduction yields the global-token sum."""

    def hold_grads(self, model: nn.Module) -> Held:
        """Before a step's backwards: set aside gradients that were already reduced (accumulation)."""

    def sync_grads(self, model: nn.Module, held: Held) -> None:
        """After a step's backwards: reduce the new gradients over the data-parallel ranks, add the held ones."""

    def needs_autocast(self, dtype: torch.dtype) -> bool:
        """Whether the runner must autocast to `dtype` (False where the wrapper casts parameters itself)."""

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """The optimizer's checkpoint state (an `archon_ckpt` Stateful)."""

    def local_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer that holds this rank's state tensors (for offload)."""


class FsdpLayout:
    """FSDP2 (with TP / CP / PP / EP as the allocation says): parameters sharded over the data-parallel ranks.

    `dims`: the engine's ParallelDims; `distributed`: whether the engine runs on several ranks."""

    def __init__(self, dims, *, distributed: bool) -> None:
        self.dims = dims
        self.distributed = distributed

    def wrap(self, model: nn.Module, dims, plan, *, device_type: str, ac: str, compile, fsdp, **hooks: Any) -> None:
        from archon_parallel.parallelize import parallelize

        parallelize(model, dims, plan, device_type=device_type, ac=ac, compile=compile, fsdp=fsdp, **hooks)

    def build_optimizer(self, model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, cfg), **adamw_kwargs(cfg, device_type))

    def loss_scale_world(self) -> int:
        # FSDP2 averages gradients over the data-parallel (x cp) ranks; the global-token normalisation wants
        # their sum, so each rank's loss is multiplied by that size. (FSDP2's divide factor would say this
        # directly, but its PREMUL_SUM reduction does not exist on gloo.)
        return self.dims.dp_cp if self.distributed else 1

    def hold_grads(self, model: nn.Module) -> Held:
        return []  # FSDP2 adds each reduce-scatter to the sharded grad itself

    def sync_grads(self, model: nn.Module, held: Held) -> None:
        return None  # FSDP2 reduces in its backward hooks

    def needs_autocast(self, dtype: torch.dtype) -> bool:
        fsdp_mp = self.distributed and self.dims.fsdp_enabled  # FSDP2's MixedPrecisionPolicy casts instead
        return dtype != torch.float32 and not fsdp_mp

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from archon_ckpt import OptimizerState

        return OptimizerState(model, optimizer)

    def local_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer


class Zero1Layout:
    """Full replicas, gradients all-reduced once per step, AdamW state sharded over `group` (ZeRO-1).

    `group`: the data-parallel process group, None on one process (then it trains like one device, built
    without FSDP). Config validation allows it only for pure data parallelism (rule zero1-pure-dp)."""

    def __init__(self, group=None) -> None:
        self.group = group

    def wrap(self, model: nn.Module, dims, plan, *, device_type: str, ac: str, compile, fsdp, **hooks: Any) -> None:
        from archon.engine.zero1 import apply_replicas

        apply_replicas(model, plan, ac=ac, compile=compile)

    def build_optimizer(self, model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
        if self.group is None:
            return torch.optim.AdamW(param_groups(model, cfg), **adamw_kwargs(cfg, device_type))
        from archon.engine.zero1 import build_zero1_optimizer

        return build_zero1_optimizer(param_groups(model, cfg), self.group, **adamw_kwargs(cfg, device_type))

    def loss_scale_world(self) -> int:
        return 1  # `sync_grads` sums the replicas' grads with a plain all-reduce: no compensation

    def hold_grads(self, model: nn.Module) -> Held:
        """Set aside grads an earlier `accumulate_grads` already summed, so the next all-reduce sums only the new
        ones (FSDP2 likewise adds each reduce-scatter to the sharded grad)."""
        if self.group is None:
            return []
        held = [(p, p.grad) for p in model.parameters() if p.grad is not None]
        for p, _ in held:
            p.grad = None
        return held

    def sync_grads(self, model: nn.Module, held: Held) -> None:
        """Sum the replicas' gradients over dp once, after every micro-batch's backward."""
        if self.group is None:
            return
        from archon_parallel.replicate import all_reduce_grads

        all_reduce_grads(model.parameters(), self.group)
        for p, g in held:
            p.grad = g if p.grad is None else p.grad.add_(g)

    def needs_autocast(self, dtype: torch.dtype) -> bool:
        return dtype != torch.float32

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.group is None:
            from archon_ckpt import OptimizerState

            return OptimizerState(model, optimizer)
        from archon.engine.zero1 import Zero1OptimizerState  # each rank writes the parameters it owns

        return Zero1OptimizerState(model, optimizer)

    def local_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from archon.engine.zero1 import local_optimizer

        return local_optimizer(optimizer)


def make_dp_layout(name: str, dims, *, group=None) -> DataParallelLayout:
    """The layout for `actor.archon.dp_layout` (already validated). `group`: the data-parallel (x cp) process
    group, None on one process."""
    if name == "zero1":
        return Zero1Layout(group)
    if name == "fsdp":
        return FsdpLayout(dims, distributed=group is not None)
    raise ValueError(f"actor.archon.dp_layout {name!r} is not one of ['fsdp', 'zero1']")
