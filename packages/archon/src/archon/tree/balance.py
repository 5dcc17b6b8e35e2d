"""Tree-aware data-parallel balance for the engine: give each DP rank a contiguous DFS-order run of
sequences, so shared prefixes stay on one rank, cut where the ranks' predicted tree costs are closest.

Usage (every rank holds the same global batch)::

    rank, world = engine.dp_rank_world()
    mine = balance_for_tree(global_batch, rank, world, cost_model=tree_cost_model(engine.model))
    engine.train_batch(mine, loss_fn, loss_weight_fn)
"""

from __future__ import annotations

from archon_attn.tree import TreeBalance, TreeCostModel, balance_tree_segments

from archon.engine.batch import PackedBatch


def tree_cost_model(model) -> TreeCostModel:
    """The FLOP-based tree cost model of a Decoder's shape."""
    a = model.args
    return TreeCostModel.for_model(a.dim, a.ffn_dim, a.n_heads, a.head_dim, a.n_kv_heads)


def tree_balance(batch: PackedBatch, dp_world: int, cost_model: TreeCostModel | None = None) -> TreeBalance:
    """The split of `batch` over `dp_world` ranks (sequence indices, stats and predicted cost per rank)."""
    return balance_tree_segments(batch.sequences(), dp_world, cost_model)


def balance_for_tree(batch: PackedBatch, dp_rank: int, dp_world: int, cost_model: TreeCostModel | None = None
                     ) -> PackedBatch:
    """This rank's share of the global `batch` (identical on every rank) under tree-aware balance."""
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_world}); pass engine.dp_rank_world()")
    return batch.select(tree_balance(batch, dp_world, cost_model).rank_sequences[dp_rank])
