"""Tensor-parallel pieces the generic plan does not cover: the per-head q/k norms of Qwen3. (The vocab-parallel
LM head is built whole with its mesh: `archon.models.common.head.LMHead`.)
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_head_norm_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Qwen3's q_norm / k_norm act on this rank's heads ([T, H/tp, Dh], heads sharded on dim 1): keep their
    weights replicated DTensors so the weight gradient is summed over the tp ranks."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    for block in model.layers.values():
        attn = block.attention
        if attn.q_norm is not None:
            style = {"q_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
                     "k_norm": SequenceParallel(sequence_dim=1, use_local_output=True)}
            parallelize_module(attn, tp_mesh, style)
