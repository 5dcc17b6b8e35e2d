"""Ancestor-only ("sparse") attention over a packed tree.

Query ``i`` sees key ``j`` iff ``j`` is an ancestor-or-self of ``i``. Tokens are in DFS pre-order, so
with ``end[j]`` the exclusive end of ``j``'s subtree the test is ``j <= i < end[j]``: O(1) per pair, no
dense mask needed. The FlexAttention BlockMask is built at block level from the same intervals.

Legend: N: tree tokens, H: query heads, G: kv heads, D: head dim, B: mask block size, Q/K: query and
key blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from archon_attn.tree.trie import PackedTree

__all__ = [
    "tree_mask_dense",
    "tree_mask_mod",
    "tree_block_mask",
    "tree_attention",
    "TreeAttnMeta",
    "TreeAttention",
]


def tree_mask_dense(tree: PackedTree) -> torch.Tensor:
    """Dense [N, N] bool ancestor-or-self mask (row = query). O(N^2) memory: for CPU and small trees."""
    idx_N = torch.arange(tree.num_tree_tokens, device=tree.device)
    return (idx_N[None, :] <= idx_N[:, None]) & (idx_N[:, None] < tree.subtree_end_N[None, :])


def _padded_end(tree: PackedTree, block_size: int) -> torch.Tensor:
    N = tree.num_tree_tokens
    padded = -(-N // block_size) * block_size
    # Padded keys get end 0 so they are invisible; the padding keeps mask_mod's lookups in bounds when
    # the kernel evaluates the tail of the last block.
    return F.pad(tree.subtree_end_N, (0, padded - N), value=0)


def tree_mask_mod(tree: PackedTree, block_size: int = 128):
    """FlexAttention mask_mod for ancestor-or-self attention (O(1) per pair)."""
    end_N = _padded_end(tree, block_size)

    def ancestor_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < end_N[kv_idx])

    return ancestor_mask


def _blocks_to_indices(blocks_QK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_Q = blocks_QK.sum(-1).to(torch.int32)
    # Stable sort puts each row's selected blocks first, in ascending kv order.
    idx_QK = torch.argsort(blocks_QK.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num_Q[None, None], idx_QK[None, None]


def tree_block_mask(tree: PackedTree, block_size: int = 128) -> BlockMask:
    """BlockMask for ancestor attention, built from subtree intervals in O((N / B)^2), not O(N^2).

    A key block below the diagonal is needed iff some key's subtree reaches the query block, and is
    full (mask_mod skipped) iff every key's subtree covers the whole query block.
    """
    N = tree.num_tree_tokens
    end_N = _padded_end(tree, block_size)
    num_blocks = end_N.numel() // block_size
    end_KB = end_N.view(num_blocks, block_size)
    blk = torch.arange(num_blocks, device=tree.device)
    q_start_Q = blk * block_size
    q_end_Q = (q_start_Q + block_size).clamp(max=N)
    below_QK = blk[None, :] < blk[:, None]  # padded keys only live in the last block, never below
    full_QK = below_QK & (end_KB.amin(1)[None, :] >= q_end_Q[:, None])
    any_QK = (below_QK & (end_KB.amax(1)[None, :] > q_start_Q[:, None])) | (blk[None, :] == blk[:, None])
    partial_QK = any_QK & ~full_QK
    kv_num, kv_idx = _blocks_to_indices(partial_QK)
    full_num, full_idx = _blocks_to_indices(full_QK)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=tree_mask_mod(tree, block_size),
        seq_lengths=(N, N),
    )


_compiled_flex = None


def _flex(q_1HND, k_1GND, v_1GND, block_mask: BlockMask, scale: float | None) -> torch.Tensor:
    """flex_attention, compiled on accelerators (eager flex materialises all scores; CPU stays eager)."""
    global _compiled_flex
    gqa = q_1HND.shape[1] != k_1GND.shape[1]
    if q_1HND.device.type == "cpu":
        return flex_attention(q_1HND, k_1GND, v_1GND, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q_1HND, k_1GND, v_1GND, block_mask=block_mask, scale=scale, enable_gqa=gqa)


@dataclass(frozen=True)
class TreeAttnMeta:
    """Per-micro-batch attention metadata for tree mode: build once, pass to every layer."""

    tree: PackedTree
    block_mask: BlockMask | None = None
    """Required for impl="flex"; see :func:`tree_block_mask`."""
    dense_mask: torch.Tensor | None = None
    """Required for impl="dense"; see :func:`tree_mask_dense`."""

    @classmethod
    def build(
        cls, tree: PackedTree, impl: Literal["flex", "dense"] = "flex", block_size: int = 128
    ) -> TreeAttnMeta:
        if impl == "flex":
            return cls(tree, block_mask=tree_block_mask(tree, block_size))
        if impl == "dense":
            return cls(tree, dense_mask=tree_mask_dense(tree))
        raise ValueError(f'unknown tree attention impl {impl!r}; use "flex" or "dense"')


def tree_attention(
    q_NHD: torch.Tensor,
    k_NGD: torch.Tensor,
    v_NGD: torch.Tensor,
    tree: PackedTree | TreeAttnMeta,
    *,
    scale: float | None = None,
    impl: Literal["flex", "dense"] = "flex",
) -> torch.Tensor:
    """Attention where each tree token sees only its ancestors and itself; returns o_NHD.

    impl="flex": FlexAttention with a block-sparse mask (CUDA; forward only on CPU, where flex has no
    backward). impl="dense": SDPA with a dense [N, N] bool mask (any device, autograd; O(N^2) memory).
    """
    meta = tree if isinstance(tree, TreeAttnMeta) else TreeAttnMeta.build(tree, impl)
    N = meta.tree.num_tree_tokens
    if q_NHD.dim() != 3 or q_NHD.shape[0] != N or k_NGD.shape[0] != N or v_NGD.shape[0] != N:
        raise ValueError(
            f"q/k/v must be [N, heads, head_dim] with N = {N} tree tokens; got {tuple(q_NHD.shape)}, "
            f"{tuple(k_NGD.shape)}, {tuple(v_NGD.shape)}"
        )
    q_1HND, k_1GND, v_1GND = (x.transpose(0, 1).unsqueeze(0) for x in (q_NHD, k_NGD, v_NGD))
    if impl == "flex":
        if (
            q_NHD.device.type == "cpu"
            and torch.is_grad_enabled()
            and any(x.requires_grad for x in (q_NHD, k_NGD, v_NGD))
        ):
            raise ValueError('flex_attention has no backward on CPU; use impl="dense" for CPU training')
        block_mask = meta.block_mask if meta.block_mask is not None else tree_block_mask(meta.tree)
        o_1HND = _flex(q_1HND, k_1GND, v_1GND, block_mask, scale)
    elif impl == "dense":
        mask_NN = meta.dense_mask if meta.dense_mask is not None else tree_mask_dense(meta.tree)
        o_1HND = F.scaled_dot_product_attention(
            q_1HND,
            k_1GND,
            v_1GND,
            attn_mask=mask_NN,
            scale=scale,
            enable_gqa=q_NHD.shape[1] != k_NGD.shape[1],
        )
    else:
        raise ValueError(f'unknown tree attention impl {impl!r}; use "flex" or "dense"')
    return o_1HND.squeeze(0).transpose(0, 1)


class TreeAttention:
    """AttentionBackend-shaped callable for tree mode: ``backend(q, k, v, meta, scale=...)``.

    ``meta`` is a :class:`TreeAttnMeta` (build it once per micro-batch with the same ``impl``).
    """

    def __init__(self, impl: Literal["flex", "dense"] = "flex") -> None:
        if impl not in ("flex", "dense"):
            raise ValueError(f'unknown tree attention impl {impl!r}; use "flex" or "dense"')
        self.impl = impl

    def __call__(self, q_NHD, k_NGD, v_NGD, meta: TreeAttnMeta, *, scale: float | None = None):
        return tree_attention(q_NHD, k_NGD, v_NGD, meta, scale=scale, impl=self.impl)
