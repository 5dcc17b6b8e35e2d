"""SDPA backends for packed documents: pad per document, or one dense block-diagonal mask.

Legend: T packed tokens, H query heads, G key/value heads, D head dim, N documents, S longest document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archon_attn.backend import AttentionBackend, check_qkv, register_attention_backend
from archon_attn.meta import AttnMeta

__all__ = ["SdpaBackend", "padded_sdpa_attention", "dense_mask_attention", "repeat_kv"]


def repeat_kv(k_TGD: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand G key/value heads to `num_heads` (head h reads kv head h // (num_heads // G))."""
    G = k_TGD.shape[1]
    return k_TGD if G == num_heads else k_TGD.repeat_interleave(num_heads // G, dim=1)


def padded_sdpa_attention(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                          scale: float | None = None) -> torch.Tensor:
    """Pack -> pad each document to [S] -> causal SDPA over [N, H, S, D] -> unpack.

    No key-padding mask is needed: padding sits at the end of each row, so under the causal mask a
    real query (position < length) never sees it; padded query rows are dropped on unpack (their
    output grad is zero, so they add nothing to real k/v grads). Without a mask SDPA can use its
    flash kernel on CUDA.
    """
    T, H, D = q_THD.shape
    N, S = meta.num_docs, meta.max_seqlen
    doc_T, pos_T = meta.doc_ids(), meta.positions()
    if doc_T.device != q_THD.device:
        doc_T, pos_T = doc_T.to(q_THD.device), pos_T.to(q_THD.device)

    def pad(x_THD: torch.Tensor) -> torch.Tensor:
        x_NSHD = x_THD.new_zeros(N, S, H, D).index_put((doc_T, pos_T), x_THD)
        return x_NSHD.transpose(1, 2)

    q_NHSD, k_NHSD, v_NHSD = pad(q_THD), pad(repeat_kv(k_TGD, H)), pad(repeat_kv(v_TGD, H))
    o_NHSD = F.scaled_dot_product_attention(q_NHSD, k_NHSD, v_NHSD, is_causal=True, scale=scale)
    return o_NHSD.transpose(1, 2)[doc_T, pos_T]


def _dense_mask(meta: AttnMeta, device: torch.device) -> torch.Tensor:
    """bool [T, T]: same document and causal (cached on the meta, except inside a compiled block: a cache
    written by the first block's graph would make every later block compile a second graph)."""
    key = ("dense_doc_causal_mask", device)
    if key in meta.cache:
        return meta.cache[key]
    doc_T = meta.doc_ids().to(device)
    arange_T = torch.arange(doc_T.numel(), device=device)
    mask_TT = (doc_T[:, None] == doc_T[None, :]) & (arange_T[:, None] >= arange_T[None, :])
    if not torch.compiler.is_compiling():
        meta.cache[key] = mask_TT
    return mask_TT


def dense_mask_attention(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                         scale: float | None = None) -> torch.Tensor:
    """One SDPA call over the packed sequence with a [T, T] document-causal mask. Memory O(T^2)."""
    H = q_THD.shape[1]
    q_HTD, k_HTD, v_HTD = (x.transpose(0, 1) for x in (q_THD, repeat_kv(k_TGD, H), repeat_kv(v_TGD, H)))
    o_HTD = F.scaled_dot_product_attention(q_HTD, k_HTD, v_HTD, attn_mask=_dense_mask(meta, q_THD.device),
                                           scale=scale)
    return o_HTD.transpose(0, 1)


class SdpaBackend(AttentionBackend):
    """`torch.nn.functional.scaled_dot_product_attention` on packed documents.

    mode="padded" (default): pad each document to the longest, one causal SDPA over [N, H, S, D].
    mode="dense": one SDPA over the whole packed sequence with a block-diagonal causal [T, T] mask
    (fine for short batches; memory grows with T^2).
    """

    name = "sdpa"

    def __init__(self, mode: str = "padded") -> None:
        if mode not in ("padded", "dense"):
            raise ValueError(f"SdpaBackend mode must be 'padded' or 'dense', got {mode!r}")
        self.mode = mode

    def __call__(self, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                 scale: float | None = None) -> torch.Tensor:
        check_qkv(q_THD, k_TGD, v_TGD, meta)
        fn = padded_sdpa_attention if self.mode == "padded" else dense_mask_attention
        return fn(q_THD, k_TGD, v_TGD, meta, scale=scale)


register_attention_backend("sdpa", SdpaBackend)
