"""Tree training: prefix trie packing, ancestor-only attention, tree-aware DP balance and metrics."""

from archon_attn.tree.balance import TreeBalance, balance_tree_segments
from archon_attn.tree.cost import SegmentStats, TreeCostModel, TreeStats, cost_imbalance, tree_stats
from archon_attn.tree.labels import TreeLabels, gather_tree_logprobs, tree_label_index, tree_model_inputs
from archon_attn.tree.packing import TreeMicroBatch, merge_trees, pack_tree_microbatches
from archon_attn.tree.sparse import (
    TreeAttention,
    TreeAttnMeta,
    tree_attention,
    tree_block_mask,
    tree_mask_dense,
    tree_mask_mod,
)
from archon_attn.tree.trie import PackedTree, TrieNodes, build_tree, trie_nodes

__all__ = [
    "PackedTree",
    "TrieNodes",
    "build_tree",
    "trie_nodes",
    "SegmentStats",
    "TreeCostModel",
    "TreeStats",
    "tree_stats",
    "cost_imbalance",
    "TreeBalance",
    "balance_tree_segments",
    "TreeMicroBatch",
    "pack_tree_microbatches",
    "merge_trees",
    "TreeAttention",
    "TreeAttnMeta",
    "tree_attention",
    "tree_block_mask",
    "tree_mask_dense",
    "tree_mask_mod",
    "TreeLabels",
    "tree_label_index",
    "tree_model_inputs",
    "gather_tree_logprobs",
]
