"""`tree_training_mode: sparse`: the micro-batch's trie packed as one sequence, position ids = depth,
ancestor-only attention, per-sequence outputs gathered back into the flat layout.

Each shared prefix runs through the model once; a token that several sequences continue differently
(a GRPO prompt's last token) scores every child from the same hidden state. Outputs come back laid
out exactly like `FlatRunner`'s, so `loss_fn` is unchanged and autograd adds the gradients of every
sequence that shares a row.

Legend: N: tree tokens, T: flat tokens, R: output rows, H: heads, G: kv heads, D: head dim.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from archon_attn.tree import TreeAttnMeta, tree_attention

from archon.engine.batch import PackedBatch
from archon.models.common.head import LogprobRequest
from archon.tree.common import TreeRunner, tree_rows


class _TreeAttnHook:
    """`kv_hook` that replaces every layer's attention with ancestor-only tree attention."""

    def __init__(self, meta: TreeAttnMeta, impl: Literal["flex", "dense"]) -> None:
        self.meta, self.impl = meta, impl

    def __call__(self, attn, q_NHD: torch.Tensor, k_NGD: torch.Tensor, v_NGD: torch.Tensor) -> torch.Tensor:
        return tree_attention(q_NHD, k_NGD, v_NGD, self.meta, scale=attn.scale, impl=self.impl)


class SparseTreeRunner(TreeRunner):
    """The trie through the whole model in one pass (FlexAttention block-sparse mask on CUDA; a dense
    [N, N] ancestor mask with SDPA elsewhere, which has a backward)."""

    def __init__(self, model: torch.nn.Module, *, attn_impl: Literal["flex", "dense"] | None = None, **kw) -> None:
        super().__init__(model, **kw)
        self.attn_impl: Literal["flex", "dense"] = attn_impl or ("flex" if self.device.type == "cuda" else "dense")

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        tree = self._last_tree = self.build_tree(mb)
        rows = tree_rows(tree, self.head)
        hook = _TreeAttnHook(TreeAttnMeta.build(tree, self.attn_impl), self.attn_impl)
        cu = torch.tensor([0, tree.num_tree_tokens], dtype=torch.int32)  # host: no blocking device copy
        with self.autocast():
            if self.head == "value":
                v_N = self.model(tree.tokens_N, position_ids=tree.depth_N, cu_seqlens=cu, kv_hook=hook)
                return {"values": rows.to_flat(v_N.float().reshape(-1))}
            lp_R, ent_R = self.model(tree.tokens_N, position_ids=tree.depth_N, cu_seqlens=cu, kv_hook=hook,
                                     logprobs=LogprobRequest(rows.label_R, rows=rows.tree_index_R,
                                                             want_entropy=want_entropy, chunk_size=self.chunk,
                                                             keep_last_logits=True))
        out = {"logprobs": rows.to_flat(lp_R)}
        if want_entropy:
            out["entropy"] = rows.to_flat(ent_R)
        return out

    def forward_backward(self, mb: PackedBatch, loss_fn, scale: float, aux_scale: float, want_entropy: bool = True
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        res = super().forward_backward(mb, loss_fn, scale, aux_scale, want_entropy)
        self.count(self._last_tree, scale)
        return res
