"""archon-attn: attention backends for packed documents (sdpa, varlen, flex) behind one interface."""

from archon_attn.backend import AttentionBackend, check_qkv, get_attention_backend, register_attention_backend
from archon_attn.blockwise import block_attention_backward, block_attention_forward, merge_partial_attention
from archon_attn.flex import FlexBackend, document_causal_block_mask
from archon_attn.meta import (
    AttnMeta,
    build_attn_meta,
    doc_ids_from_cu_seqlens,
    positions_from_cu_seqlens,
    to_device,
)
from archon_attn.reference import reference_attention
from archon_attn.sdpa import SdpaBackend, dense_mask_attention, padded_sdpa_attention, repeat_kv
from archon_attn.tree import (
    PackedTree,
    TreeAttention,
    TreeAttnMeta,
    TreeBalance,
    TreeCostModel,
    TreeLabels,
    TreeStats,
    balance_tree_segments,
    build_tree,
    gather_tree_logprobs,
    pack_tree_microbatches,
    tree_attention,
    tree_label_index,
    tree_model_inputs,
    tree_stats,
)
from archon_attn.varlen import VarlenBackend, flash_varlen_attention, has_public_varlen_attn

__all__ = [
    "AttentionBackend",
    "AttnMeta",
    "FlexBackend",
    "PackedTree",
    "SdpaBackend",
    "TreeAttention",
    "TreeAttnMeta",
    "TreeBalance",
    "TreeCostModel",
    "TreeLabels",
    "TreeStats",
    "VarlenBackend",
    "balance_tree_segments",
    "block_attention_backward",
    "block_attention_forward",
    "build_attn_meta",
    "build_tree",
    "check_qkv",
    "dense_mask_attention",
    "doc_ids_from_cu_seqlens",
    "document_causal_block_mask",
    "flash_varlen_attention",
    "gather_tree_logprobs",
    "get_attention_backend",
    "has_public_varlen_attn",
    "merge_partial_attention",
    "pack_tree_microbatches",
    "padded_sdpa_attention",
    "positions_from_cu_seqlens",
    "to_device",
    "reference_attention",
    "register_attention_backend",
    "repeat_kv",
    "tree_attention",
    "tree_label_index",
    "tree_model_inputs",
    "tree_stats",
]
