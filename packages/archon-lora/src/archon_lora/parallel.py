"""Tensor-parallel placements for LoRA pairs, and a cross-rank trainable-set check.

A colwise base (W [O, I] sharded on O) keeps ``B`` [O, R] sharded on dim 0 like W and ``A`` [R, I]
replicated: ``x @ A^T`` is then full on every rank and ``@ B^T`` yields the local output columns. A
rowwise base (W sharded on I) shards ``A`` on dim 1 like W and replicates ``B``: ``x_shard @ A_shard^T``
is a partial sum that DTensor reduces together with the base output. No extra collective is needed
in either case.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from archon_lora.experts import ExpertLoRA
from archon_lora.layers import LoRALinear

__all__ = ["lora_tp_plan", "distribute_lora", "LoRATensorParallel", "place_lora_like_base", "check_same_trainable"]

TPStyle = Literal["colwise", "rowwise"]


def _style_name(style: TPStyle | ParallelStyle) -> TPStyle:
    if isinstance(style, ColwiseParallel) or style == "colwise":
        return "colwise"
    if isinstance(style, RowwiseParallel) or style == "rowwise":
        return "rowwise"
    raise ValueError(f"LoRA TP placement is defined for colwise/rowwise bases, got {style!r}")


def lora_tp_plan(style: TPStyle | ParallelStyle) -> dict[str, tuple[Placement, ...]]:
    """DTensor placements (on a 1-D TP mesh) of ``lora_A`` and ``lora_B`` for a colwise/rowwise base."""
    if _style_name(style) == "colwise":
        return {"lora_A": (Replicate(),), "lora_B": (Shard(0),)}
    return {"lora_A": (Shard(1),), "lora_B": (Replicate(),)}


def _place(param: torch.Tensor, mesh: DeviceMesh, placements: tuple[Placement, ...]) -> nn.Parameter:
    if isinstance(param, DTensor):
        if tuple(param.placements) == placements and param.device_mesh == mesh:
            return param if isinstance(param, nn.Parameter) else nn.Parameter(param)
        if param.is_meta:
            full = torch.empty(param.shape, dtype=param.dtype, device="meta")
        else:
            full = param.full_tensor().detach()
    else:
        full = param.detach()
    with torch.no_grad():
        placed = distribute_tensor(full, mesh, list(placements))
    return nn.Parameter(placed, requires_grad=param.requires_grad)


def distribute_lora(module: LoRALinear, mesh: DeviceMesh, style: TPStyle | ParallelStyle) -> None:
    """Turn ``module.lora_A`` / ``lora_B`` into DTensors placed for a colwise/rowwise base on ``mesh``.

    Accepts plain tensors or DTensors placed otherwise (e.g. by ColwiseParallel, which shards every
    parameter of an nn.Linear on dim 0). Values come from rank 0, like ``distribute_tensor``.
    """
    if not isinstance(module, LoRALinear):
        raise TypeError(f"distribute_lora needs a LoRALinear, got {type(module).__name__}")
    for name, placements in lora_tp_plan(style).items():
        module.register_parameter(name, _place(getattr(module, name), mesh, placements))


def _follow(base_placements: tuple[Placement, ...], shared_dims: tuple[int, int]) -> tuple[Placement, ...]:
    """Placements of a LoRA factor that shares ``shared_dims`` with the base weight: shard where the base
    is sharded on a shared dim, replicate where it is sharded on the dim the factor does not have."""
    out: list[Placement] = []
    for p in base_placements:
        if isinstance(p, Shard):
            out.append(p if p.dim in shared_dims else Replicate())
        elif isinstance(p, Replicate):
            out.append(p)
        else:
            raise ValueError(f"base weight placement {p} is not Shard/Replicate; place LoRA after sharding weights")
    return tuple(out)


def place_lora_like_base(module: LoRALinear | ExpertLoRA) -> None:
    """Give every LoRA factor of ``module`` the mesh of its (already DTensor) base weight and matching
    placements, on any number of mesh dims.

    Linear W [O, I]: B [O, R] follows W's dim 0, A [R, I] its dim 1. Expert W [E, O, I]: B [E, O, R]
    follows dims 0-1, A [E, R, I] dims 0 and 2; so EP (``Shard(0)``) shards both on experts. A base
    that is not a DTensor is a no-op.

    Expert-TP (expert weights sharded on O or I) is rejected: the expert forward runs on local shards
    (``to_local``), so a factor replicated over a mesh dim on which the base is sharded would get a
    partial gradient that nothing reduces.
    """
    if isinstance(module, LoRALinear):
        pairs = [("weight", "lora_A", "lora_B", (1, 1), (0, 0))]
    elif isinstance(module, ExpertLoRA):
        pairs = [(w, f"lora_A_{w}", f"lora_B_{w}", (0, 2), (0, 1)) for w in module.lora_targets]
    else:
        raise TypeError(f"place_lora_like_base needs a LoRALinear or ExpertLoRA, got {type(module).__name__}")
    for base_name, a_name, b_name, a_dims, b_dims in pairs:
        base = getattr(module, base_name)
        if not isinstance(base, DTensor):
            continue
        placements = tuple(base.placements)
        mesh = base.device_mesh
        if isinstance(module, ExpertLoRA) and any(isinstance(p, Shard) and p.dim != 0 for p in placements):
            raise ValueError(
                f"expert weight {base_name} has placements {placements}; expert LoRA supports expert "
                "parallel (Shard(0)) and replication only, not expert-tensor parallel (Shard(1)/Shard(2))"
            )
        module.register_parameter(a_name, _place(getattr(module, a_name), mesh, _follow(placements, a_dims)))
        module.register_parameter(b_name, _place(getattr(module, b_name), mesh, _follow(placements, b_dims)))


class LoRATensorParallel(ParallelStyle):
    """Wrap a ColwiseParallel/RowwiseParallel style so LoRALinear's A/B get the matching placements.

    Use it in a TP plan in place of the base style: ``{"wq": LoRATensorParallel(ColwiseParallel())}``;
    on a plain nn.Linear it behaves exactly like the wrapped style.
    """

    def __init__(self, base_style: ColwiseParallel | RowwiseParallel) -> None:
        super().__init__()
        _style_name(base_style)
        self.base_style = base_style

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = self.base_style._apply(module, device_mesh)
        if isinstance(module, LoRALinear):
            distribute_lora(module, device_mesh, self.base_style)
        return module


def check_same_trainable(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Raise ValueError unless every rank has the same trainable parameter names and shapes.

    FSDP2 reduce-scatters and TP collectives run per trainable parameter; a rank with a different set
    would wait forever, so call this once after injection and parallelization.
    """
    if not dist.is_initialized():
        return
    desc = "\n".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad)
    digest = hashlib.sha256(desc.encode()).hexdigest()
    world = dist.get_world_size(group)
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) != 1:
        ranks = {d: [r for r in range(world) if digests[r] == d] for d in set(digests)}
        raise ValueError(
            f"ranks disagree on the trainable parameters (groups of ranks: {list(ranks.values())}); "
            "inject LoRA with the same config on every rank before parallelizing"
        )
