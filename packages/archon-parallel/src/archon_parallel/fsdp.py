"""FSDP2 (``fully_shard``): one unit per decoder block, the embedding, the final norm + head, and the root.

A 1-D mesh shards; a 2-D ``(dp_replicate, dp_shard_cp)`` mesh gives HSDP (replicate across the first
axis, shard across the second).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

__all__ = ["FSDPConfig", "apply_fsdp", "mixed_precision_policy"]

_RESHARD = ("default", "always", "never")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class FSDPConfig:
    """FSDP2 settings."""

    param_dtype: str = "bfloat16"
    """Dtype parameters are all-gathered and computed in (master weights stay fp32)."""
    reduce_dtype: str = "float32"
    """Dtype of the gradient reduce-scatter / all-reduce."""
    reshard_after_forward: str = "default"
    """'default' (reshard except the last block and head; never with pp), 'always', or 'never'."""
    cpu_offload: bool = False
    """Keep sharded params, grads and optimizer step on CPU."""

    def __post_init__(self) -> None:
        if self.reshard_after_forward not in _RESHARD:
            raise ValueError(f"reshard_after_forward must be one of {', '.join(_RESHARD)}, got "
                             f"{self.reshard_after_forward!r}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} unknown; expected one of {', '.join(_DTYPES)}")


def mixed_precision_policy(param_dtype: str | torch.dtype = "bfloat16",
                           reduce_dtype: str | torch.dtype = "float32") -> MixedPrecisionPolicy:
    """``MixedPrecisionPolicy`` from dtype names (fp32 params + fp32 reduce is plain fp32 training)."""
    p = _DTYPES[param_dtype] if isinstance(param_dtype, str) else param_dtype
    r = _DTYPES[reduce_dtype] if isinstance(reduce_dtype, str) else reduce_dtype
    return MixedPrecisionPolicy(param_dtype=p, reduce_dtype=r)


def _offload_policy(cpu_offload: bool) -> OffloadPolicy:
    if not cpu_offload:
        return OffloadPolicy()
    # pinned host memory needs an accelerator; on a CPU-only machine pinning raises
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    groups: Sequence[nn.Module | Sequence[nn.Module]],
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: str = "default",
    cpu_offload: bool = False,
    pp_enabled: bool = False,
    expert_groups: Sequence[nn.Module] = (),
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """``fully_shard`` each of ``groups`` in order (a list inside ``groups`` becomes one unit), then the root.

    ``groups`` normally is ``[embedding, *blocks, [norm, head]]``. With ``reshard_after_forward`` 'default'
    every unit reshards after forward except the last one (backward needs it immediately); with pipeline
    parallelism nothing reshards (micro-batches would re-gather each time). ``expert_groups`` (MoE
    experts, already sharded over ``ep``) are sharded over ``expert_mesh`` (the ``edp`` axis) first.
    """
    if reshard_after_forward not in _RESHARD:
        raise ValueError(f"reshard_after_forward must be one of {', '.join(_RESHARD)}, got "
                         f"{reshard_after_forward!r}")
    common = dict(mp_policy=mp_policy or MixedPrecisionPolicy(), offload_policy=_offload_policy(cpu_offload))
    if expert_groups and expert_mesh is None:
        raise ValueError("expert_groups need expert_mesh (the edp mesh)")
    for experts in expert_groups:
        fully_shard(experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward != "never", **common)
    for index, group in enumerate(groups):
        if reshard_after_forward == "always":
            reshard = True
        elif reshard_after_forward == "never":
            reshard = False
        else:
            reshard = not pp_enabled and index < len(groups) - 1
        unit = group if isinstance(group, nn.Module) else list(group)
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard, **common)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward == "always", **common)
