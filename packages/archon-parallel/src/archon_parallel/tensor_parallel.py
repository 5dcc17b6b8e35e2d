"""Tensor + sequence parallel over packed tokens: activations are ``[T, D]``; SP shards dim 0 (tokens).

Legend: T packed tokens, D model dim, V vocab. Styles are picked by name from a ``ParallelPlan``.
Between blocks the residual stream is the local token shard ``[T/tp, D]``; inside attention / MLP
every tp rank sees all tokens and a slice of the heads / hidden units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from .plan import ParallelPlan

__all__ = ["GatherSequence", "STYLE_NAMES", "StyleFactory", "apply_tp", "make_style", "validate_tp"]

STYLE_NAMES = ("colwise", "rowwise", "rowwise_seq", "sequence", "gather_seq", "gather_scatter_seq", "embedding",
               "head")


def validate_tp(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise ValueError unless ``tp`` divides both the attention heads and the KV heads."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    bad = [f"{name} {n}" for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)) if n % tp]
    if bad:
        valid = [d for d in range(1, min(num_heads, num_kv_heads) + 1)
                 if num_heads % d == 0 and num_kv_heads % d == 0]
        raise ValueError(f"tensor parallel size {tp} must divide the attention heads ({', '.join(bad)} is not "
                         f"divisible); pick tp in {valid}")


class GatherSequence(ParallelStyle):
    """All-gather the first positional input from the token shard ``Shard(0)`` to all tokens (local).

    Other positional and keyword inputs (rope caches, cu_seqlens, masks) pass through untouched, so the
    module may take any extra arguments; ``PrepareModuleInput`` would need a layout for each.
    With ``scatter_output`` the (tp-replicated) output tensor is cut back to this rank's token shard,
    for modules whose output is not reduce-scattered by a rowwise layer (e.g. an MoE layer whose experts
    are replicated over tp or reduced inside the expert-parallel runner).
    """

    def __init__(self, *, scatter_output: bool = False) -> None:
        super().__init__()
        self.scatter_output = scatter_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            if not args:
                raise ValueError(f"{type(module).__name__} under gather_seq must take the hidden states as its "
                                 f"first positional argument")
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (Shard(0),), run_check=False)
            return (x.redistribute(device_mesh, (Replicate(),)).to_local(), *args[1:]), kwargs

        module.register_forward_pre_hook(gather, with_kwargs=True)
        if self.scatter_output:
            def scatter(_mod: nn.Module, _args: Any, out_TD: Any):
                # every tp rank computed the same full output: keep this rank's token shard (no comm)
                full = DTensor.from_local(out_TD, device_mesh, (Replicate(),), run_check=False)
                return full.redistribute(device_mesh, (Shard(0),)).to_local()

            module.register_forward_hook(scatter)
        return module


def make_style(name: str, *, sequence_parallel: bool = True, loss_parallel: bool = True) -> ParallelStyle | None:
    """Build the ParallelStyle for a style name; None means 'nothing to do' (SP off)."""
    seq = Shard(0) if sequence_parallel else Replicate()
    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        return RowwiseParallel()
    if name == "rowwise_seq":
        return RowwiseParallel(output_layouts=seq)
    if name == "sequence":
        return SequenceParallel(sequence_dim=0) if sequence_parallel else None
    if name == "gather_seq":
        return GatherSequence() if sequence_parallel else None
    if name == "gather_scatter_seq":
        return GatherSequence(scatter_output=True) if sequence_parallel else None
    if name == "embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if name == "head":
        if loss_parallel:
            return ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
        return ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    raise ValueError(f"unknown tensor-parallel style {name!r}; expected one of {', '.join(STYLE_NAMES)}")


# Called like `make_style(name, sequence_parallel=..., loss_parallel=...)`; returns a style or None (skip).
# Lets a caller wrap or replace the styles (e.g. LoRA-aware ones) without archon_parallel knowing about them.
StyleFactory = Callable[..., ParallelStyle | None]


def _styles(plan_map: dict[str, str], style_factory: StyleFactory, **opts: bool) -> dict[str, ParallelStyle]:
    out = {}
    for module_name, style_name in plan_map.items():
        style = style_factory(style_name, **opts)
        if style is not None:
            out[module_name] = style
    return out


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: ParallelPlan, *, sequence_parallel: bool = True,
             loss_parallel: bool = True, style_factory: StyleFactory | None = None) -> None:
    """Shard ``model`` in place over ``tp_mesh`` following ``plan`` (embedding, final norm, head, blocks).

    Token ids enter replicated on every tp rank; with SP the token count ``T`` must be divisible by tp.
    With ``loss_parallel`` the head returns logits as a DTensor sharded on the vocab dim.
    ``style_factory`` builds each style from its plan name in place of ``make_style`` (same signature).
    """
    factory = style_factory or make_style
    opts = dict(sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    # Mixed models (dense and MoE blocks) skip names a block lacks; a name no block has is a typo.
    unused = set(plan.block_tp) | set(plan.moe_tp)
    per_block: list[tuple[nn.Module, dict[str, str]]] = []
    for _, block in plan.block_list(model):
        block_plan = dict(plan.block_tp)
        if plan.experts is not None and plan.optional_module(block, plan.experts) is not None:
            block_plan.update(plan.moe_tp)
        block_plan = {k: v for k, v in block_plan.items() if plan.optional_module(block, k) is not None}
        unused -= set(block_plan)
        per_block.append((block, block_plan))
    if unused:
        raise ValueError(f"ParallelPlan names block submodules {sorted(unused)} that no block has; fix the plan")
    top: dict[str, str] = {}
    for name, style in ((plan.embedding, "embedding"), (plan.norm, "sequence"), (plan.head, "head")):
        if name is not None and plan.optional_module(model, name) is not None:
            top[name] = style
    if top_styles := _styles(top, factory, **opts):
        parallelize_module(model, tp_mesh, top_styles)
    for block, block_plan in per_block:
        if block_styles := _styles(block_plan, factory, **opts):
            parallelize_module(block, tp_mesh, block_styles)
