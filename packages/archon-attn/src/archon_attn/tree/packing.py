"""Pack a batch into tree micro-batches under a tree-token budget.

Sequences are taken in DFS (lexicographic) order and cut into contiguous runs, so sharing sequences
land in the same micro-batch; each run becomes one packed tree (a forest when it has several roots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from archon_attn.tree.balance import SegmentCoster
from archon_attn.tree.trie import PackedTree, TokenSequences, as_token_tensors, build_tree, sort_batch

__all__ = ["TreeMicroBatch", "pack_tree_microbatches", "merge_trees"]


@dataclass(frozen=True)
class TreeMicroBatch:
    seq_ids: list[int]
    """Original indices of the batch's sequences; sequence k of ``tree`` is ``seq_ids[k]``."""
    tree: PackedTree


def pack_tree_microbatches(sequences: TokenSequences, max_tree_tokens: int) -> list[TreeMicroBatch]:
    """Fewest contiguous DFS-order runs whose trees each hold at most ``max_tree_tokens`` tokens."""
    seqs = as_token_tensors(sequences)
    longest = max(s.numel() for s in seqs)
    if longest > max_tree_tokens:
        raise ValueError(
            f"a sequence of {longest} tokens exceeds max_tree_tokens={max_tree_tokens}; raise the budget "
            "or truncate the sequence"
        )
    sb = sort_batch(seqs)
    coster = SegmentCoster(sb.lens_S.tolist(), sb.lcp_S.tolist(), lambda st: st.tree_tokens)
    order = sb.order.tolist()
    out, a = [], 0
    while a < len(order):
        b = coster.furthest(a, max_tree_tokens)
        ids = order[a:b]
        out.append(TreeMicroBatch(ids, build_tree([seqs[i] for i in ids])))
        a = b
    return out


def merge_trees(trees: Sequence[PackedTree]) -> PackedTree:
    """Concatenate packed trees into one forest; sequences keep their order, tree after tree."""
    if len(trees) == 0:
        raise ValueError("no trees to merge; pass at least one PackedTree")
    node_off = 0
    tok_off = 0
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("tok", "par", "dep", "end", "idx", "cu")}
    for t in trees:
        parts["tok"].append(t.tokens_N)
        parts["par"].append(torch.where(t.parent_N >= 0, t.parent_N + node_off, -1))
        parts["dep"].append(t.depth_N)
        parts["end"].append(t.subtree_end_N + node_off)
        parts["idx"].append(t.seq_index_T + node_off)
        parts["cu"].append(t.cu_seqlens[1:] + tok_off)
        node_off += t.num_tree_tokens
        tok_off += t.num_tokens
    parts["cu"].insert(0, trees[0].cu_seqlens[:1])
    return PackedTree(*(torch.cat(parts[k]) for k in ("tok", "par", "dep", "end", "idx", "cu")))
