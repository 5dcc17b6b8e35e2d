"""Model-agnostic pieces of DTA (depth-first tree training with prefix-KV reuse).

DTA walks the trie depth first. Each trie node is cut into *blocks* of at most ``block_size`` tokens;
a block attends to the cached K/V of its ancestors (the root-to-block path) and causally to itself. So
the model only ever holds one block's activations plus the K/V cache of one root-to-leaf path.

Legend: N: tree tokens, M: trie nodes, B: blocks, Q: a block's (query) tokens, C: cached ancestor
tokens, K: keys (C + Q), H: query heads, G: kv heads, D: head dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from archon_attn.tree.trie import PackedTree, trie_nodes

__all__ = ["DtaSchedule", "dta_schedule", "prefix_attention"]


@dataclass(frozen=True)
class DtaSchedule:
    """Blocks of a packed tree in DFS pre-order (a parent block always comes before its children)."""

    start_B: torch.Tensor
    """int64 first tree index of each block (blocks are contiguous runs of tree tokens)."""
    length_B: torch.Tensor
    """int64 tokens in each block."""
    parent_B: torch.Tensor
    """int64 parent block, -1 for roots."""
    has_children_B: torch.Tensor
    """bool: some block attends to this block's K/V (so it must be cached)."""

    @property
    def num_blocks(self) -> int:
        return self.start_B.numel()


def dta_schedule(tree: PackedTree, block_size: int = 0) -> DtaSchedule:
    """Split every trie node into chained blocks of at most ``block_size`` tokens (0 = whole nodes)."""
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0 (0 = do not split trie nodes), got {block_size}")
    nodes = trie_nodes(tree)
    len_M = nodes.length_M
    nb_M = (len_M + block_size - 1) // block_size if block_size > 0 else torch.ones_like(len_M)
    B = int(nb_M.sum())
    node_B = torch.repeat_interleave(torch.arange(nodes.num_nodes, device=len_M.device), nb_M)
    first_M = torch.cumsum(nb_M, 0) - nb_M
    last_M = first_M + nb_M - 1
    k_B = torch.arange(B, device=len_M.device) - first_M[node_B]  # block index inside its node
    step = block_size if block_size > 0 else 0
    start_B = nodes.start_M[node_B] + k_B * step
    length_B = len_M[node_B] - k_B * step
    if block_size > 0:
        length_B = length_B.clamp(max=block_size)
    parent_node_B = nodes.parent_M[node_B]
    parent_B = torch.where(
        k_B > 0,
        torch.arange(B, device=len_M.device) - 1,
        torch.where(parent_node_B >= 0, last_M[parent_node_B.clamp(min=0)], -1),
    )
    has_children_B = torch.bincount(parent_B[parent_B >= 0], minlength=B) > 0
    return DtaSchedule(start_B, length_B, parent_B, has_children_B)


def prefix_attention(
    q_QHD: torch.Tensor,
    k_QGD: torch.Tensor,
    v_QGD: torch.Tensor,
    k_cache_CGD: torch.Tensor | None = None,
    v_cache_CGD: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    seg_lens: list[int] | None = None,
) -> torch.Tensor:
    """Attention of Q new tokens over C cached ancestor tokens (all visible) and causally over themselves.

    ``seg_lens`` (host list summing to Q) packs several sibling documents that share the cache: each sees
    the whole cache and causally its own tokens only, never a sibling's. Gradients flow into the cache
    tensors too (summed over the siblings), which is how DTA collects d loss / d (ancestor K, V).
    Returns o_QHD. CUDA fp16/bf16: FlashAttention varlen with a bottom-right causal mask
    (`archon_attn.varlen.flash_prefix_attention`); elsewhere SDPA with a lower-right causal bias (one
    document) or a dense mask (several).
    """
    Q, H = q_QHD.shape[0], q_QHD.shape[1]
    if seg_lens is not None and (sum(seg_lens) != Q or min(seg_lens, default=0) < 1):
        raise ValueError(f"seg_lens {seg_lens} must be positive and sum to the {Q} query tokens")
    if seg_lens is not None and len(seg_lens) == 1:
        seg_lens = None
    C = 0 if k_cache_CGD is None else k_cache_CGD.shape[0]
    if C > 0:
        k_QGD = torch.cat([k_cache_CGD, k_QGD])
        v_QGD = torch.cat([v_cache_CGD, v_QGD])
    G = k_QGD.shape[1]
    if H % G:
        raise ValueError(f"{H} query heads are not a multiple of {G} kv heads")
    if q_QHD.is_cuda and q_QHD.dtype in (torch.float16, torch.bfloat16):
        from archon_attn.varlen import flash_prefix_attention

        if seg_lens is None:
            return flash_prefix_attention(q_QHD, k_QGD, v_QGD, scale=scale)
        # Keys laid out per document, [cache; own tokens] each: the cache is copied once per sibling.
        idx_K = _sibling_key_index(C, tuple(seg_lens), q_QHD.device)
        return flash_prefix_attention(q_QHD, k_QGD[idx_K], v_QGD[idx_K], scale=scale, seg_q=seg_lens,
                                      seg_k=[C + n for n in seg_lens])
    # Expanding kv heads keeps every SDPA kernel available (CausalBias kernels do not all take enable_gqa).
    k_1HKD = k_QGD.repeat_interleave(H // G, dim=1).transpose(0, 1).unsqueeze(0)
    v_1HKD = v_QGD.repeat_interleave(H // G, dim=1).transpose(0, 1).unsqueeze(0)
    q_1HQD = q_QHD.transpose(0, 1).unsqueeze(0)
    K = k_1HKD.shape[2]
    if seg_lens is None:
        mask = None if Q == K else causal_lower_right(Q, K)
    else:
        doc_Q = torch.repeat_interleave(torch.arange(len(seg_lens)), torch.tensor(seg_lens)).to(q_QHD.device)
        pos_Q = torch.arange(Q, device=q_QHD.device)
        own_QQ = (doc_Q[:, None] == doc_Q[None, :]) & (pos_Q[None, :] <= pos_Q[:, None])
        mask = torch.cat([own_QQ.new_ones(Q, C), own_QQ], dim=1)
    o_1HQD = F.scaled_dot_product_attention(
        q_1HQD, k_1HKD, v_1HKD, attn_mask=mask, is_causal=mask is None and Q == K, scale=scale
    )
    return o_1HQD.squeeze(0).transpose(0, 1)


@functools.lru_cache(maxsize=16)
def _sibling_key_index(C: int, seg_lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 index into [cache (C); packed own tokens] laying out each document's keys as [cache; own]. Cached:
    every layer of a unit asks for the same one (built and copied once per unit, not once per layer)."""
    parts, offset = [], C
    for n in seg_lens:
        parts += [torch.arange(C), torch.arange(offset, offset + n)]
        offset += n
    idx = torch.cat(parts)
    if device.type == "cuda":
        idx = idx.pin_memory()
    return idx.to(device, non_blocking=True)
