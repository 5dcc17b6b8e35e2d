"""Tensor-parallel pieces the generic plan does not cover: the LM head with vocab-parallel logprobs (the
vocab is sharded and never gathered) and the per-head q/k norms of Qwen3.

The head weight is sharded on the vocab dim over the tp mesh. Its input arrives on the sequence shard
(sequence parallel) and is all-gathered; with labels the head returns per-token logprobs / entropy
computed from the local vocab shard by `archon.engine.logprobs.head_logprobs` (per-token statistics are
all-reduced, the logits never are). Without labels
(plain `model(ids)` calls) the logits are gathered over the vocab, which is fine for small evaluations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def _full_sequence(h: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    # Stay a DTensor: the head's matmul against the vocab-sharded weight then yields vocab-sharded
    # logits, and in backward DTensor sums the partial input grads of the vocab shards.
    if not isinstance(h, DTensor):
        h = DTensor.from_local(h, mesh, [Shard(0)], run_check=False)
    return h.redistribute(mesh, [Replicate()])


def apply_vocab_parallel_head(head: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `head` (an archon LMHead) over `tp_mesh` on the vocab dim, in place."""
    w = head.weight
    if not isinstance(w, DTensor):  # a tied weight may already be sharded by the embedding's plan
        head.weight = nn.Parameter(distribute_tensor(w, tp_mesh, [Shard(0)]), requires_grad=w.requires_grad)
    vocab = head.weight.shape[0]
    per_rank = -(-vocab // tp_mesh.size())
    head.tp_mesh = tp_mesh
    head.vocab_start = tp_mesh.get_local_rank() * per_rank
    head.gather_logits = lambda logits: logits.full_tensor()

    def pre_hook(_mod, args, kwargs):
        return (_full_sequence(args[0], tp_mesh), *args[1:]), kwargs

    head.register_forward_pre_hook(pre_hook, with_kwargs=True)


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
