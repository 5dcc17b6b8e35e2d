"""Activation checkpointing (AC) per decoder block: ``none``, ``full``, ``selective``, ``selective:N``,
``memory_budget``.

- ``full``: recompute the whole block in backward.
- ``selective`` (op-level SAC): keep matmul, attention and reduce-scatter outputs, recompute the rest
  (norms, activations, elementwise ops are cheap to recompute and costly to store).
- ``selective:N``: full AC on every N-th block only (layer-level selective).
- ``memory_budget``: no wrapping; sets torch's compile-time activation memory budget (0..1) so the
  min-cut partitioner decides what to save. Needs compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .plan import ParallelPlan

__all__ = ["ACConfig", "apply_ac", "checkpoint_block", "save_ops_policy", "set_activation_memory_budget"]

_MODES = ("none", "full", "selective", "memory_budget")


@dataclass
class ACConfig:
    """Activation checkpointing settings; ``ACConfig.parse("selective:2")`` also works."""

    mode: str = "none"
    """One of none, full, selective, memory_budget."""
    every_n_layers: int = 0
    """With mode selective: 0 = op-level SAC on every block; N > 0 = full AC on blocks N-1, 2N-1, ..."""
    memory_budget: float = 0.5
    """With mode memory_budget: fraction (0..1] of activation memory to keep; needs compile."""
    debug: bool = False
    """Run torch.utils.checkpoint in debug mode (traces recomputed ops on a mismatch)."""
    determinism_check: str = "default"
    """torch.utils.checkpoint determinism_check: 'default' compares recomputed shapes/dtypes, or 'none'."""

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown activation checkpointing mode {self.mode!r}; expected one of "
                             f"{', '.join(_MODES)} (or 'selective:N')")
        if self.every_n_layers < 0:
            raise ValueError(f"every_n_layers must be >= 0, got {self.every_n_layers}")
        if not 0.0 < self.memory_budget <= 1.0:
            raise ValueError(f"memory_budget must be in (0, 1], got {self.memory_budget}")

    @classmethod
    def parse(cls, spec: str | ACConfig | None, **kwargs) -> ACConfig:
        """``"none" | "full" | "selective" | "selective:N" | "memory_budget[:F]"`` -> ACConfig."""
        if isinstance(spec, ACConfig):
            return spec
        if spec is None:
            return cls(**kwargs)
        mode, _, arg = spec.partition(":")
        if not arg:
            return cls(mode=mode, **kwargs)
        try:
            if mode == "selective":
                return cls(mode=mode, every_n_layers=int(arg), **kwargs)
            if mode == "memory_budget":
                return cls(mode=mode, memory_budget=float(arg), **kwargs)
        except ValueError as err:
            if "invalid literal" not in str(err) and "could not convert" not in str(err):
                raise
        raise ValueError(f"bad activation checkpointing spec {spec!r}; expected 'selective:N' with an int N or "
                         f"'memory_budget:F' with a float F")


def _save_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_flash_attention_forward", "_efficient_attention_forward"):
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    # reduce-scatter outputs of TP (functional collectives, used by DTensor): saving avoids re-communicating
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    return ops


def save_ops_policy(save_ops: set | None = None) -> Callable:
    """SAC policy: MUST_SAVE the outputs of ``save_ops`` (default: matmuls, attention, reduce-scatter)."""
    ops = _save_ops() if save_ops is None else save_ops

    def policy(_ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _checkpoint_wrapper(module: nn.Module, **checkpoint_kwargs) -> nn.Module:
    """torch's (private-path) checkpoint_wrapper: it keeps state_dict keys unchanged (strips its prefix).

    Present in torch.distributed.algorithms._checkpoint for 2.11..2.15; FSDP2 composes with it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(module, preserve_rng_state=False, **checkpoint_kwargs)


def checkpoint_block(block: nn.Module, config: ACConfig, *, selective_ops: bool) -> nn.Module:
    """Wrap one block: full recompute, or op-level SAC when ``selective_ops``."""
    kwargs: dict = dict(determinism_check=config.determinism_check, debug=config.debug)
    if selective_ops:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, save_ops_policy())
    return _checkpoint_wrapper(block, **kwargs)


def set_activation_memory_budget(budget: float) -> None:
    """Set torch's compile-time activation memory budget (private functorch config; one place)."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = budget


def apply_ac(model: nn.Module, plan: ParallelPlan, config: ACConfig | str | None, *, compiled: bool) -> None:
    """Apply activation checkpointing to every block of ``model`` in place (blocks are replaced)."""
    config = ACConfig.parse(config)
    if config.mode == "none":
        return
    if config.mode == "memory_budget":
        if not compiled:
            raise ValueError("activation checkpointing mode 'memory_budget' works through torch.compile's "
                             "partitioner; enable compile or choose 'full' / 'selective'")
        set_activation_memory_budget(config.memory_budget)
        return
    container = model.get_submodule(plan.blocks)
    for index, (name, block) in enumerate(container.named_children()):
        if config.mode == "selective" and config.every_n_layers > 0:
            if (index + 1) % config.every_n_layers != 0:
                continue
            wrapped = checkpoint_block(block, config, selective_ops=False)
        else:
            wrapped = checkpoint_block(block, config, selective_ops=config.mode == "selective")
        container.register_module(name, wrapped)
