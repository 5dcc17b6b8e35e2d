"""FlexAttention with a document-causal BlockMask built from cu_seqlens.

The BlockMask is built at block granularity from each block's first/last document id (no [T, T]
mask is materialised, no Python loop over tokens) and cached on the `AttnMeta`. On CUDA
`flex_attention` is compiled once per process. On CPU, FlexAttention has no backward: when a
gradient is needed this backend falls back to the dense-mask SDPA path and logs that once
(`cpu_grad="raise"` raises instead); CPU forward under no_grad runs real FlexAttention.

Legend: T packed tokens, H query heads, G key/value heads, D head dim, Q / K query / key blocks.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from archon_attn.backend import AttentionBackend, check_qkv, register_attention_backend
from archon_attn.meta import AttnMeta
from archon_attn.sdpa import dense_mask_attention

__all__ = ["FlexBackend", "document_causal_block_mask"]

log = logging.getLogger(__name__)

_compiled_flex = None


def _flex_fn(device: torch.device, compile: bool):
    global _compiled_flex
    if device.type == "cuda" and compile:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        return _compiled_flex
    return flex_attention


def _ordered_indices(blocks_QK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask layout: per query block, the count of selected kv blocks and their indices first."""
    num_Q = blocks_QK.sum(dim=-1, dtype=torch.int32)
    order_QK = torch.argsort(blocks_QK.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num_Q[None, None], order_QK[None, None]


def document_causal_block_mask(meta: AttnMeta, device: torch.device, block_size: int = 128) -> BlockMask:
    """BlockMask for causal attention within documents of the packed batch (cached on `meta`)."""
    key = ("flex_block_mask", device, block_size)
    if key in meta.cache:
        return meta.cache[key]
    T = meta.num_tokens
    num_blocks = -(-T // block_size)
    doc_T = meta.doc_ids().to(device)
    # Indices past T (the last partial block) read doc id -1; their rows / columns are discarded.
    doc_padded = torch.full((num_blocks * block_size,), -1, dtype=doc_T.dtype, device=device)
    doc_padded[:T] = doc_T
    first_Q = doc_T[torch.arange(num_blocks, device=device) * block_size]
    last_Q = doc_T[torch.clamp(torch.arange(1, num_blocks + 1, device=device) * block_size, max=T) - 1]
    idx_Q = torch.arange(num_blocks, device=device)
    below_QK = idx_Q[None, :] < idx_Q[:, None]   # every kv token precedes every query token
    causal_QK = idx_Q[None, :] <= idx_Q[:, None]
    # Documents are contiguous, so [first, last] doc ranges overlap iff some token pair shares a doc.
    overlap_QK = (first_Q[None, :] <= last_Q[:, None]) & (last_Q[None, :] >= first_Q[:, None])
    one_doc_Q = first_Q == last_Q
    full_QK = below_QK & one_doc_Q[:, None] & one_doc_Q[None, :] & (first_Q[:, None] == first_Q[None, :])
    partial_QK = causal_QK & overlap_QK & ~full_QK

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_padded[q_idx] == doc_padded[kv_idx]) & (q_idx >= kv_idx)

    kv_num, kv_idx = _ordered_indices(partial_QK)
    full_num, full_idx = _ordered_indices(full_QK)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                          mask_mod=mask_mod, seq_lengths=(T, T))
    meta.cache[key] = block_mask
    return block_mask


class FlexBackend(AttentionBackend):
    """FlexAttention over the packed sequence with a document-causal BlockMask.

    block_size: BlockMask tile (128 matches the CUDA kernels). compile: compile flex on CUDA (it is
    slow and memory-hungry uncompiled). cpu_grad: "fallback" (dense SDPA, logged once) or "raise".
    """

    name = "flex"

    def __init__(self, block_size: int = 128, compile: bool = True, cpu_grad: str = "fallback") -> None:
        if cpu_grad not in ("fallback", "raise"):
            raise ValueError(f"FlexBackend cpu_grad must be 'fallback' or 'raise', got {cpu_grad!r}")
        if block_size <= 0:
            raise ValueError(f"FlexBackend block_size must be positive, got {block_size}")
        self.block_size, self.compile, self.cpu_grad = block_size, compile, cpu_grad
        self._logged_fallback = False

    def __call__(self, q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, meta: AttnMeta, *,
                 scale: float | None = None) -> torch.Tensor:
        check_qkv(q_THD, k_TGD, v_TGD, meta)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_THD, k_TGD, v_TGD))
        if q_THD.device.type == "cpu" and needs_grad:
            if self.cpu_grad == "raise":
                raise ValueError("FlexAttention has no backward on CPU; use attn_impl='sdpa' or 'varlen' on CPU, "
                                 "or FlexBackend(cpu_grad='fallback')")
            if not self._logged_fallback:
                log.info("flex attention: no CPU backward in FlexAttention, using the dense-mask SDPA path")
                self._logged_fallback = True
            return dense_mask_attention(q_THD, k_TGD, v_TGD, meta, scale=scale)
        block_mask = document_causal_block_mask(meta, q_THD.device, self.block_size)
        q_1HTD, k_1GTD, v_1GTD = (x.transpose(0, 1).unsqueeze(0) for x in (q_THD, k_TGD, v_TGD))
        flex = _flex_fn(q_THD.device, self.compile)
        o_1HTD = flex(q_1HTD, k_1GTD, v_1GTD, block_mask=block_mask, scale=scale,
                      enable_gqa=k_TGD.shape[1] != q_THD.shape[1])
        return o_1HTD[0].transpose(0, 1)


register_attention_backend("flex", FlexBackend)
