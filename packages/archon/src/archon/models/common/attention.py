"""Grouped-query self-attention over packed tokens. T: packed tokens, D: model dim, H: heads, G: kv heads,
Dh: head dim. Under tensor parallelism H and G are the local head counts; reshapes use -1 for that reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from archon.models.common.args import ModelArgs
from archon.models.common.layers import RMSNorm
from archon.models.common.rope import apply_rope

if TYPE_CHECKING:
    from archon_attn import AttentionBackend


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.scale = args.head_dim**-0.5
        self.backend: AttentionBackend | None = None  # set by the owning Decoder

    def forward(self, x_TD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta, kv_hook=None
                ) -> torch.Tensor:
        T = x_TD.shape[0]
        q_THD = self.wq(x_TD).view(T, -1, self.head_dim)
        k_TGD = self.wk(x_TD).view(T, -1, self.head_dim)
        v_TGD = self.wv(x_TD).view(T, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q_THD, k_TGD = self.q_norm(q_THD), self.k_norm(k_TGD)
        cos_TD, sin_TD = rope
        # RoPE tables are fp32 under autocast; keep q/k in the projection dtype (bf16) so the attention
        # kernel runs in low precision, as SDPA's autocast cast does for the HF reference.
        q_THD = apply_rope(q_THD, cos_TD, sin_TD).to(v_TGD.dtype)
        k_TGD = apply_rope(k_TGD, cos_TD, sin_TD).to(v_TGD.dtype)
        if kv_hook is not None:  # KV-cache users (sampler, prefix reuse) take over the attention call
            if getattr(kv_hook, "traceable", True):  # traced into the compiled block (e.g. sparse tree attention)
                o_THD = kv_hook(self, q_THD, k_TGD, v_TGD)
            else:
                o_THD = _run_kv_hook(kv_hook, self, q_THD, k_TGD, v_TGD)
        else:
            assert self.backend is not None, "Decoder.set_attention_backend sets it"
            o_THD = self.backend(q_THD, k_TGD, v_TGD, meta, scale=self.scale)
        return self.wo(o_THD.reshape(T, -1))


@torch.compiler.disable
def _run_kv_hook(kv_hook, attn, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor) -> torch.Tensor:
    """A KV hook marked ``traceable = False`` runs eagerly: its Python state (a cached path, segment lengths) changes
    every call. Inside a block compiled without fullgraph this is the one graph break; the projections and the MLP
    around it stay compiled."""
    return kv_hook(attn, q_THD, k_TGD, v_TGD)
