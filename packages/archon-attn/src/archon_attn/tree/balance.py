"""Tree-aware DP balance: split a batch into contiguous DFS-order segments, one per DP rank.

Sequences are sorted lexicographically, so sequences sharing a prefix are adjacent and a contiguous
segment keeps its sharing on one rank. The split minimises the maximum predicted cost of a rank's
packed tree (an exact bottleneck partition for any cost model monotone in the segment's stats).

Legend: S: sequences in sorted (DFS) order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from archon_attn.tree.cost import SegmentStats, TreeCostModel, cost_imbalance
from archon_attn.tree.trie import TokenSequences, as_token_tensors, sort_batch

__all__ = ["TreeBalance", "SegmentCoster", "balance_tree_segments"]

CostFn = Callable[[SegmentStats], float]


class SegmentCoster:
    """O(1) stats and cost of any run [a, b) of sorted sequences, from prefix sums.

    The run's tree holds all of sequence a plus, for each later sequence, its tokens past the common
    prefix with the previous one.
    """

    def __init__(self, lens_S: list[int], lcp_S: list[int], cost_fn: CostFn) -> None:
        self.lens_S, self.cost_fn = lens_S, cost_fn
        self._tok = [0]
        self._pair = [0]
        for n, c in zip(lens_S, lcp_S):
            self._tok.append(self._tok[-1] + n - c)
            self._pair.append(self._pair[-1] + (n * (n + 1) - c * (c + 1)) // 2)

    def stats(self, a: int, b: int) -> SegmentStats:
        if a >= b:
            return SegmentStats(0, 0, 0)
        n = self.lens_S[a]
        return SegmentStats(
            num_sequences=b - a,
            tree_tokens=n + self._tok[b] - self._tok[a + 1],
            attn_pairs=n * (n + 1) // 2 + self._pair[b] - self._pair[a + 1],
        )

    def cost(self, a: int, b: int) -> float:
        return float(self.cost_fn(self.stats(a, b))) if a < b else 0.0

    def furthest(self, a: int, limit: float) -> int:
        """Largest b > a with cost(a, b) <= limit (a + 1 if even one sequence exceeds it)."""
        lo, hi = a + 1, len(self.lens_S)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(a, mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _greedy_cuts(coster: SegmentCoster, limit: float, max_segments: int) -> list[int] | None:
    """Fewest contiguous segments with cost <= limit (greedy is optimal for monotone costs)."""
    S, cuts = len(coster.lens_S), [0]
    while cuts[-1] < S:
        if len(cuts) > max_segments:
            return None
        b = coster.furthest(cuts[-1], limit)
        if coster.cost(cuts[-1], b) > limit:
            return None
        cuts.append(b)
    return cuts


def _split_to(coster: SegmentCoster, cuts: list[int], num_segments: int) -> list[int]:
    """Split the costliest splittable segment at its best point until there are num_segments."""
    cuts = list(cuts)
    while len(cuts) - 1 < num_segments:
        segs = [(coster.cost(a, b), i) for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b - a > 1]
        _, i = max(segs)
        a, b = cuts[i], cuts[i + 1]
        m = min(range(a + 1, b), key=lambda m: max(coster.cost(a, m), coster.cost(m, b)))
        cuts.insert(i + 1, m)
    return cuts


@dataclass(frozen=True)
class TreeBalance:
    """Assignment of sequences to DP ranks as contiguous DFS-order segments."""

    rank_sequences: list[list[int]]
    """Original sequence indices of each rank, in DFS order (build each rank's tree from these)."""
    rank_stats: list[SegmentStats]
    rank_costs: list[float]

    @property
    def max_cost(self) -> float:
        return max(self.rank_costs)

    @property
    def imbalance(self) -> float:
        """Max over mean rank cost."""
        return cost_imbalance(self.rank_costs)


def balance_tree_segments(
    sequences: TokenSequences,
    num_ranks: int,
    cost_fn: CostFn | None = None,
    *,
    rel_tol: float = 1e-12,
) -> TreeBalance:
    """Split sequences into ``num_ranks`` non-empty contiguous DFS-order segments minimising the max cost.

    Binary search on the bottleneck with a greedy feasibility check, exact up to ``rel_tol``.
    ``cost_fn`` maps :class:`SegmentStats` to a cost and must not decrease when a segment grows.
    """
    seqs = as_token_tensors(sequences)
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if len(seqs) < num_ranks:
        raise ValueError(
            f"{len(seqs)} sequences cannot fill {num_ranks} ranks with at least one each; "
            "use fewer DP ranks or a larger batch"
        )
    sb = sort_batch(seqs)
    coster = SegmentCoster(sb.lens_S.tolist(), sb.lcp_S.tolist(), cost_fn or TreeCostModel())
    S = len(seqs)
    lo = max(coster.cost(i, i + 1) for i in range(S))  # every sequence sits in some segment
    best = _greedy_cuts(coster, lo, num_ranks)
    if best is None:
        hi = coster.cost(0, S)
        best = [0, S]
        while hi - lo > rel_tol * hi:
            mid = (lo + hi) / 2
            cuts = _greedy_cuts(coster, mid, num_ranks)
            if cuts is None:
                lo = mid
            else:
                best = cuts
                hi = max(coster.cost(a, b) for a, b in zip(cuts, cuts[1:]))
    cuts = _split_to(coster, best, num_ranks)
    order = sb.order.tolist()
    segs = list(zip(cuts, cuts[1:]))
    return TreeBalance(
        rank_sequences=[order[a:b] for a, b in segs],
        rank_stats=[coster.stats(a, b) for a, b in segs],
        rank_costs=[coster.cost(a, b) for a, b in segs],
    )
