"""Cost model and metrics for tree training: tokens, tree tokens, compression, attention pairs, imbalance.

Legend: N: tree tokens, T: flat tokens, S: sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from archon_attn.tree.trie import PackedTree

__all__ = ["SegmentStats", "TreeCostModel", "TreeStats", "tree_stats", "cost_imbalance"]


@dataclass(frozen=True)
class SegmentStats:
    """Work of one packed tree (or of a run of sequences packed as one tree)."""

    num_sequences: int
    tree_tokens: int
    """Tokens the model runs (each shared prefix once)."""
    attn_pairs: int
    """Query-key pairs of ancestor attention: sum over tree tokens of (depth + 1)."""


@dataclass(frozen=True)
class TreeCostModel:
    """Predicted compute of a packed tree: ``token_cost * tree_tokens + pair_cost * attn_pairs``.

    The default ``pair_cost`` is the FLOP ratio of one attention pair (about ``4 * dim`` per layer for
    QK^T and PV) to one token's dense matmuls (about ``24 * dim**2`` per layer with a 4x MLP) at
    ``dim = 2048``; use :meth:`for_model` for a specific model.
    """

    token_cost: float = 1.0
    pair_cost: float = 1.0 / (6 * 2048)

    @classmethod
    def for_model(
        cls, dim: int, ffn_dim: int, num_heads: int, head_dim: int, num_kv_heads: int
    ) -> TreeCostModel:
        """Cost in units of one token's per-layer matmul FLOPs (q, kv, o projections and a gated MLP)."""
        token_flops = 2 * dim * (num_heads * head_dim * 2 + num_kv_heads * head_dim * 2) + 6 * dim * ffn_dim
        pair_flops = 4 * num_heads * head_dim
        return cls(token_cost=1.0, pair_cost=pair_flops / token_flops)

    def __call__(self, stats: SegmentStats) -> float:
        return self.token_cost * stats.tree_tokens + self.pair_cost * stats.attn_pairs


@dataclass(frozen=True)
class TreeStats:
    """Flat vs tree work of one batch."""

    num_sequences: int
    num_tokens: int
    num_tree_tokens: int
    flat_attn_pairs: int
    """Causal pairs of flat packed training: sum over sequences of L * (L + 1) / 2."""
    tree_attn_pairs: int
    flat_cost: float
    tree_cost: float

    @property
    def compression_ratio(self) -> float:
        """Flat tokens per tree token (>= 1; 1 means no sharing)."""
        return self.num_tokens / self.num_tree_tokens

    @property
    def cost_ratio(self) -> float:
        """Predicted speed-up of tree training over flat training."""
        return self.flat_cost / self.tree_cost


def tree_stats(tree: PackedTree, cost_model: TreeCostModel | None = None) -> TreeStats:
    """Tokens, tree tokens, attention pairs and predicted costs of a packed tree."""
    cost_model = cost_model or TreeCostModel()
    lens_S = torch.diff(tree.cu_seqlens)
    flat_pairs = int((lens_S * (lens_S + 1) // 2).sum())
    tree_pairs = tree.attention_pairs
    S, T, N = tree.num_sequences, tree.num_tokens, tree.num_tree_tokens
    return TreeStats(
        num_sequences=S,
        num_tokens=T,
        num_tree_tokens=N,
        flat_attn_pairs=flat_pairs,
        tree_attn_pairs=tree_pairs,
        flat_cost=cost_model(SegmentStats(S, T, flat_pairs)),
        tree_cost=cost_model(SegmentStats(S, N, tree_pairs)),
    )


def cost_imbalance(rank_costs: Sequence[float]) -> float:
    """Max over mean of per-rank costs (1.0 is perfect balance, also when every rank is idle)."""
    if len(rank_costs) == 0:
        raise ValueError("no ranks given; pass one cost per rank")
    mean = sum(rank_costs) / len(rank_costs)
    return max(rank_costs) / mean if mean > 0 else 1.0
