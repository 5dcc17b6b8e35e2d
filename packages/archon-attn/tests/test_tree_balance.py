"""Tree-aware DP balance against brute-force optimal splits and a greedy token split."""

import itertools

import pytest
import torch
from archon_attn.tree import (
    SegmentStats,
    TreeCostModel,
    balance_tree_segments,
    build_tree,
    cost_imbalance,
    tree_stats,
)
from archon_attn.tree.testing import grpo_batch, mixed_batch, multiturn_batch
from hypothesis import given, settings
from hypothesis import strategies as st

COST = TreeCostModel(token_cost=1.0, pair_cost=0.01)


def _ref_stats(seqs) -> SegmentStats:
    """Segment stats from distinct prefixes (a prefix of length L is one tree token attending L keys)."""
    prefixes = {tuple(s[: k + 1]) for s in seqs for k in range(len(s))}
    return SegmentStats(len(seqs), len(prefixes), sum(len(p) for p in prefixes))


def _dfs_order(seqs) -> list[int]:
    return sorted(range(len(seqs)), key=lambda i: seqs[i])


def _brute_force_best(seqs, num_ranks, cost_fn) -> float:
    order = _dfs_order(seqs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(seqs)), num_ranks - 1):
        bounds = (0, *cuts, len(seqs))
        worst = max(
            cost_fn(_ref_stats([seqs[order[i]] for i in range(a, b)])) for a, b in zip(bounds, bounds[1:])
        )
        best = min(best, worst)
    return best


def _greedy_token_split_cost(seqs, num_ranks, cost_fn) -> float:
    """Baseline: walk DFS order, close a rank once it holds its share of flat tokens."""
    order = _dfs_order(seqs)
    target = sum(len(s) for s in seqs) / num_ranks
    ranks, cur, acc = [], [], 0
    for n, i in enumerate(order):
        cur.append(i)
        acc += len(seqs[i])
        left_seqs, left_ranks = len(order) - n - 1, num_ranks - len(ranks) - 1
        if left_ranks > 0 and (acc >= target * (len(ranks) + 1) or left_seqs == left_ranks):
            ranks.append(cur)
            cur = []
    ranks.append(cur)
    assert len(ranks) == num_ranks and all(ranks)
    return max(cost_fn(_ref_stats([seqs[i] for i in r])) for r in ranks)


def _check_partition(seqs, bal, num_ranks, cost_fn):
    assert len(bal.rank_sequences) == num_ranks and all(bal.rank_sequences)
    flat = [i for r in bal.rank_sequences for i in r]
    assert sorted(flat) == list(range(len(seqs)))  # every sequence exactly once
    assert [seqs[i] for i in flat] == sorted(seqs)  # contiguous segments of the DFS order
    for r, ids in enumerate(bal.rank_sequences):
        ref = _ref_stats([seqs[i] for i in ids])
        assert bal.rank_stats[r] == ref
        assert bal.rank_costs[r] == pytest.approx(cost_fn(ref), rel=1e-12)
    assert bal.imbalance == pytest.approx(cost_imbalance(bal.rank_costs))


def _lists(seqs):
    return [s.tolist() for s in seqs]


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_on_small_cases(num_ranks, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = _lists(mixed_batch(g))[:9]
    bal = balance_tree_segments(seqs, num_ranks, COST)
    _check_partition(seqs, bal, num_ranks, COST)
    assert bal.max_cost == pytest.approx(_brute_force_best(seqs, num_ranks, COST), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), min_size=3, max_size=8),
    st.integers(1, 3),
)
def test_optimal_property_with_custom_cost(seqs, num_ranks):
    cost_fn = lambda s: s.tree_tokens**2 + 0.5 * s.attn_pairs + s.num_sequences  # any monotone model
    bal = balance_tree_segments(seqs, num_ranks, cost_fn)
    _check_partition(seqs, bal, num_ranks, cost_fn)
    assert bal.max_cost == pytest.approx(_brute_force_best(seqs, num_ranks, cost_fn), rel=1e-9)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_not_worse_than_greedy_and_keeps_groups(num_ranks):
    g = torch.Generator().manual_seed(5)
    seqs = _lists(grpo_batch(g, 8, 4, 30, 20) + multiturn_batch(g, 4, 3, 10))
    bal = balance_tree_segments(seqs, num_ranks, COST)
    _check_partition(seqs, bal, num_ranks, COST)
    assert bal.max_cost <= _greedy_token_split_cost(seqs, num_ranks, COST) + 1e-9
    total_tree = tree_stats(build_tree(seqs)).num_tree_tokens
    if num_ranks <= 4:  # for this batch the optimum splits no group, so no prompt is duplicated
        assert sum(s.tree_tokens for s in bal.rank_stats) == total_tree


def test_errors():
    with pytest.raises(ValueError, match="cannot fill 3 ranks"):
        balance_tree_segments([[1], [2]], 3)
    with pytest.raises(ValueError, match="num_ranks must be >= 1"):
        balance_tree_segments([[1], [2]], 0)


def test_cost_model_for_model():
    m = TreeCostModel.for_model(dim=64, ffn_dim=256, num_heads=4, head_dim=16, num_kv_heads=2)
    s = SegmentStats(1, 10, 55)
    assert m(s) == pytest.approx(10 + 55 * m.pair_cost)
    assert 0 < m.pair_cost < 1
