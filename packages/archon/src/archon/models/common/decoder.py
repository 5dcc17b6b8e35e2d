"""The decoder shared by every Qwen-family model.

Activations are packed: one flat token dim T holding all documents of a micro-batch back to back, with
`cu_seqlens` [N+1] marking document boundaries; attention never crosses a document. A padded [B, S]
input is accepted too and is packed as B documents of length S.

T: packed tokens, D: model dim, V: vocab, B: batch, S: sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from archon.models.common.args import ModelArgs
from archon.models.common.attention import Attention
from archon.models.common.head import LMHead, LogprobRequest, ValueHead
from archon.models.common.layers import FeedForward, RMSNorm
from archon.models.common.packing import PackedInput, pack_inputs
from archon.models.common.rope import rope_cos_sin, rope_inv_freq


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe_enabled = args.is_moe_layer(layer_id)
        if self.moe_enabled:
            from archon_moe import MoE

            self.moe = MoE(moe_args_from(args))
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, h_TD: torch.Tensor, rope, meta, kv_hook=None) -> torch.Tensor:
        h_TD = h_TD + self.attention(self.attention_norm(h_TD), rope, meta, kv_hook)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h_TD + ffn(self.ffn_norm(h_TD))


def moe_args_from(args: ModelArgs):
    from archon_moe import MoEArgs

    return MoEArgs(dim=args.dim, moe_inter_dim=args.moe_inter_dim, num_experts=args.num_experts,
                   top_k=args.top_k, score_func="softmax", norm_topk_prob=args.norm_topk_prob,
                   aux_loss_coef=args.router_aux_loss_coef)


class Decoder(nn.Module):
    """Qwen-family decoder with a language-model head (`head="lm"`) or a scalar value head (`head="value"`).

    Layers live in a ModuleDict keyed by the layer index so a pipeline stage can drop the ones it does not
    own and keep checkpoint names stable; `tok_embeddings`, `norm` and the head may be None on such stages.
    """

    rope_inv_freq: torch.Tensor  # a non-persistent buffer (registered in __init__)

    def __init__(self, args: ModelArgs, head: str = "lm") -> None:
        super().__init__()
        if head not in ("lm", "value"):
            raise ValueError(f"head must be 'lm' or 'value', got {head!r}")
        self.args = args
        self.head_kind = head
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: LMHead | None = None
        self.score: ValueHead | None = None
        if head == "lm":
            tied = self.tok_embeddings.weight if args.tie_embeddings else None
            self.output = LMHead(args.dim, args.vocab_size, weight=tied)
        else:
            self.score = ValueHead(args.dim)
        inv_freq, self.rope_attn_factor = rope_inv_freq(args.rope, args.head_dim, args.max_position_embeddings)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.hf_config: dict[str, Any] | None = None  # the HF config this model came from, for export
        self.set_attention_backend("sdpa")

    # ----------------------------------------------------------------------------------------------
    def set_attention_backend(self, backend: Any) -> None:
        """Use an `archon_attn.AttentionBackend` (or its name) in every layer."""
        if isinstance(backend, str):
            from archon_attn import get_attention_backend

            backend = get_attention_backend(backend)
        self.attn_backend = backend
        for block in self.layers.values():
            block.attention.backend = backend

    def tie_weights(self) -> None:
        """Share the LM head with the embedding when the config ties them (again after `to_empty`)."""
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse: bool = True):  # materialising breaks parameter sharing: re-tie
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init (HF style: normal(0, initializer_range), zero bias, unit norms) and RoPE buffers."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.args.initializer_range
        norms = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for name, p in self.named_parameters():
            if id(p) in norms:
                nn.init.ones_(p)
            elif name.endswith("bias"):
                p.zero_()
            else:  # linear, embedding and stacked expert weights
                _normal_(p, std, gen)
        for name, b in self.named_buffers():
            if name.endswith("expert_bias"):
                b.zero_()
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute RoPE tables and zero run-time statistics buffers (non-persistent, so `to_empty` left
        them uninitialised and no checkpoint restores them)."""
        persistent = set(self.state_dict().keys())
        for name, b in self.named_buffers():
            if name not in persistent and name != "rope_inv_freq" and b.is_floating_point():
                b.zero_()
        inv_freq, _ = rope_inv_freq(self.args.rope, self.args.head_dim, self.args.max_position_embeddings)
        self.rope_inv_freq = inv_freq.to(self.rope_inv_freq.device)

    # ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, *, packed: PackedInput | None = None, kv_hook=None,
                logprobs: LogprobRequest | None = None, return_hidden: bool = False) -> Any:
        """`hidden_states`, then `apply_head`: logits [B, S, V] for a padded [B, S] input or [T, V] / [1, T, V] for
        packed input, values for a value head, or the LM head's (logprobs, entropy) for a `LogprobRequest`.

        `return_hidden=True` (or a pipeline stage before the last, which holds no norm) stops after the hidden
        states. `kv_hook` (a KV cache's or tree runner's per-layer attention callback) runs the blocks eagerly.
        One entry point, so FSDP2's root hooks unshard the embedding, norm and head around both parts.
        """
        if packed is None:
            packed = pack_inputs(input_ids, position_ids, cu_seqlens)
        h_TD = self.hidden_states(packed, kv_hook)
        if self.norm is None or return_hidden:  # a pipeline stage before the last: its activations
            return packed.unflatten(h_TD) if self.norm is not None else h_TD
        return self.apply_head(h_TD, packed, logprobs)

    def apply_head(self, h_TD: torch.Tensor, packed: PackedInput, logprobs: LogprobRequest | None = None) -> Any:
        """The head on final hidden states [T, D]: with `logprobs` the LM head's (logprobs, entropy) of its labels
        ([T], or [P] at `logprobs.rows`); otherwise logits / values in `packed`'s input layout."""
        if logprobs is not None and self.output is not None:
            if logprobs.rows is not None:
                h_TD = h_TD[logprobs.rows]
            return self.output(h_TD, logprobs.labels.reshape(-1), chunk_size=logprobs.chunk_size,
                               want_entropy=logprobs.want_entropy, keep_last_logits=logprobs.keep_last_logits)
        head = self.output if self.output is not None else self.score
        return packed.unflatten(head(h_TD) if head is not None else h_TD)

    def hidden_states(self, packed: PackedInput, kv_hook=None) -> torch.Tensor:
        """[T, D] hidden states after the last block, final-normed where this model (stage) holds the norm.
        `kv_hook` (a KV cache's per-layer callback) runs the blocks eagerly, never a compiled stack."""
        h_TD = self.tok_embeddings(packed.tokens) if self.tok_embeddings is not None else packed.tokens
        rope = rope_cos_sin(self.rope_inv_freq, packed.position_ids, self.rope_attn_factor, h_TD.dtype)
        if kv_hook is None:
            h_TD = self.run_layers(h_TD, rope, packed.meta)
        else:  # KV-cache users call back into Python per layer: never through a compiled layer stack
            h_TD = Decoder.run_layers(self, h_TD, rope, packed.meta, kv_hook)
        return self.norm(h_TD) if self.norm is not None else h_TD

    def run_layers(self, h_TD: torch.Tensor, rope, meta, kv_hook=None) -> torch.Tensor:
        """Every decoder block in order. The compile scope "stack" replaces this method on the instance with
        one compiled graph of all blocks (`archon_parallel.compile`); `Decoder.run_layers` stays eager."""
        for block in self.layers.values():
            h_TD = block(h_TD, rope, meta, kv_hook)
        return h_TD

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary load-balancing losses of the MoE layers from the last forward."""
        losses = [b.moe.aux_loss for b in self.layers.values() if getattr(b, "moe_enabled", False)]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None


def _normal_(w: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    if gen is None or w.device.type != "cpu" or type(w) is not torch.Tensor and not isinstance(w, nn.Parameter):
        nn.init.normal_(w, 0.0, std)
    else:
        w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32).mul_(std).to(w.dtype))
