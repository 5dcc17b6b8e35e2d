"""Balanced k-way partitioning of samples by cost (pure functions, deterministic).

- ``ffd``: largest cost first, each to the currently least-loaded part (LPT / first-fit-decreasing
  for balancing).
- ``kk``: Karmarkar-Karp largest differencing, k-way: every item starts as a k-part partial
  partition; the two partials with the largest spread (max - min load) are merged by pairing the
  heaviest part of one with the lightest of the other, until one remains.

Guarantee (tested): for both methods, max load - min load <= largest item cost, hence
max load <= mean load + largest item. LPT: the max part's last item went to the then-lightest part.
KK: merging partials of spread a and b gives spread <= max(a, b), and a single item has spread = cost.
With ``groups``, the items are whole groups (cost = sum of their samples), so the bound uses the
largest group cost. Ties break by index, so every rank computes the same answer from the same input.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

__all__ = ["partition_balanced", "token_cost", "attention_cost", "BALANCE_METHODS", "CostFn"]

BALANCE_METHODS = ("ffd", "kk")
CostFn = Callable[[Sequence[int]], list[float]]


def token_cost(lengths: Sequence[int]) -> list[float]:
    """Cost = number of tokens."""
    return [float(n) for n in lengths]


def attention_cost(alpha: float) -> CostFn:
    """Cost = L + alpha * L^2: linear layers plus the quadratic attention term."""
    if alpha < 0:
        raise ValueError(f"attention cost alpha must be >= 0, got {alpha}")
    return lambda lengths: [float(n) + alpha * float(n) * float(n) for n in lengths]


def _lpt(costs: Sequence[float], k: int) -> list[list[int]]:
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, p) for p in range(k)]
    parts: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        load, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (load + costs[i], p))
    return parts


def _karmarkar_karp(costs: Sequence[float], k: int) -> list[list[int]]:
    # Heap entries: (-spread, tie, parts) with parts sorted by load, heaviest first.
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for i, c in enumerate(costs):
        parts = [(float(c), [i])] + [(0.0, []) for _ in range(k - 1)]
        heap.append((-float(c), i, parts))
    heapq.heapify(heap)
    tie = len(costs)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda p: (-p[0], min(p[1], default=-1)))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    if not heap:
        return [[] for _ in range(k)]
    return [items for _, items in heap[0][2]]


def partition_balanced(costs: Sequence[float], num_parts: int, method: str = "kk",
                       groups: Sequence[int] | None = None) -> list[list[int]]:
    """Split item indices ``range(len(costs))`` into ``num_parts`` lists of similar total cost.

    ``groups`` (one id per item): keep each group's items in one part. Each part is sorted ascending.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if method not in BALANCE_METHODS:
        raise ValueError(f"unknown balance method {method!r}; choose one of {BALANCE_METHODS}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be non-negative")
    if groups is not None and len(groups) != len(costs):
        raise ValueError(f"groups has {len(groups)} entries but costs has {len(costs)}")
    algo = _lpt if method == "ffd" else _karmarkar_karp
    if groups is None:
        return [sorted(p) for p in algo(costs, num_parts)]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    group_items = list(members.values())
    group_costs = [sum(costs[i] for i in m) for m in group_items]
    return [sorted(i for g in p for i in group_items[g]) for p in algo(group_costs, num_parts)]
