"""Context parallelism in the engine: each cp rank runs a slice of every micro-batch's tokens.

The micro-batch is padded and sliced per cp rank by `archon_parallel.shard_packed_batch` (layout picked
by the CP attention backend: contiguous for Ulysses, load-balanced chunks for ring). The model gets this
rank's tokens, their RoPE positions inside their documents, and the attention metadata of the WHOLE
padded batch; every attention layer runs the CP backend (`get_cp_attention`) around the configured
inner backend. Per-token logprobs / entropy / values are all-gathered over the cp group back to the
micro-batch's original, unpadded order (`gather_sequence`), so `loss_fn(outputs, mb)` sees exactly the
outputs a single process would produce, and the padding never reaches the loss.

Loss normalisation. Every cp rank of a dp index computes the same loss on the gathered outputs;
`gather_sequence`'s backward hands each rank the gradient of its own token slice only, so for the
gradients the cp ranks hold disjoint tokens, as dp ranks do, and the engine's handling of FSDP2's
reduction over dp_shard x cp applies unchanged. The loss weights do not: the engine sums them over the
`dp_cp` group, where the cp ranks of one dp index all count the same micro-batch, giving cp x the true
total. So each rank multiplies the engine's loss scale by cp. The MoE aux loss is computed on each
rank's own tokens; keeping the engine's aux scale averages it over the cp ranks. The reported loss
needs no fix (its sum and its weight are both counted cp times).

Legend: T micro-batch tokens (unpadded), L this rank's tokens of the padded micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
from archon.engine.batch import PackedBatch
from archon.engine.logprobs import next_token_labels, shift_to_tokens
from archon.engine.runner import FlatRunner
from archon.models.common.head import LogprobRequest
from archon.models.common.packing import PackedInput


class ContextParallelRunner(FlatRunner):
    """A `FlatRunner` whose micro-batches are split over the `cp` mesh (Ulysses or ring attention).

    `mb_max_tokens` stays a per-rank budget: a micro-batch holds up to cp x `mb_max_tokens` tokens (before
    the padding to a multiple of cp x tp, x2 for ring; planned by `archon.engine.micro_batches`).
    """

    def __init__(self, model: torch.nn.Module, *, cp_mesh, cp_impl: str = "ulysses", **kw) -> None:
        from archon_parallel.context_parallel import UlyssesAttention, get_cp_attention

        super().__init__(model, **kw)
        self.cp_group = cp_mesh.get_group()
        self.cp_rank, self.cp_size = cp_mesh.get_local_rank(), cp_mesh.size()
        inner = model.attn_backend
        if isinstance(inner, UlyssesAttention):  # the model was already wrapped by an earlier runner
            inner = inner.inner
        self.backend = get_cp_attention(cp_impl, inner, self.cp_group)
        model.set_attention_backend(self.backend)

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        from archon_parallel.context_parallel import gather_sequence, shard_packed_batch

        ids_T, cu = mb.input_ids.to(self.device), mb.cu_seqlens.to(self.device)
        shard = shard_packed_batch(cu, ids_T, next_token_labels(ids_T), cp_rank=self.cp_rank,
                                   cp_size=self.cp_size, pad_multiple=self.pad_multiple, layout=self.backend.layout)
        ids_L, labels_L = shard.tensors
        packed = PackedInput(ids_L, shard.positions_L, shard.meta.cu_seqlens, shard.meta, (ids_L.shape[0],))

        def gather(x_L: torch.Tensor) -> torch.Tensor:
            return gather_sequence(x_L, shard, self.cp_group)

        with self.autocast():
            if self.head == "value":
                values_L = self.model(ids_L, packed=packed)
                return {"values": gather(values_L.float().reshape(-1))}
            lp_L, ent_L = self.model(ids_L, packed=packed, logprobs=LogprobRequest(
                labels_L, want_entropy=want_entropy, chunk_size=self.chunk, keep_last_logits=True))
        out = {"logprobs": shift_to_tokens(gather(lp_L), cu)}
        if want_entropy:
            out["entropy"] = shift_to_tokens(gather(ent_L), cu)
        return out

    def forward_backward(self, mb: PackedBatch, loss_fn, scale: float, aux_scale: float, want_entropy: bool = True
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        # cp x: the engine's total weight counted this micro-batch once per cp rank (see module docstring)
        return super().forward_backward(mb, loss_fn, scale * self.cp_size, aux_scale, want_entropy)
