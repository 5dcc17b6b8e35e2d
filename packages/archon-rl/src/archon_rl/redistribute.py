"""Balance rollout samples across data-parallel ranks.

Every rank holds a local RolloutBatch (any size). ``redistribute`` all-gathers the per-sample
metadata (lengths, group ids) with ``all_gather_object`` so every rank computes the same assignment
(archon_rl.balance), then moves the samples with ``all_to_all_single`` (one call per field). Global
sample ``g`` is local sample ``g - offset[r]`` of rank ``r`` (ranks in order); each rank receives its
assigned samples in ascending global order. No sample is lost or duplicated.

Shapes: T: packed tokens, N: sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from archon_rl.balance import CostFn, partition_balanced, token_cost
from archon_rl.batch import SAMPLE_FIELDS, TOKEN_FIELDS, RolloutBatch

__all__ = ["plan_redistribution", "redistribute", "Redistributed"]


@dataclass
class Redistributed:
    """The batch this rank now holds and the global index of each of its samples."""

    batch: RolloutBatch
    global_indices: list[int]
    assignment: list[list[int]]
    """Global sample indices held by each rank after the move (same on every rank)."""


def plan_redistribution(lengths: list[int], num_ranks: int, method: str = "kk", cost_fn: CostFn | None = None,
                        group_ids: list[int] | None = None) -> list[list[int]]:
    """Global sample indices for each rank; ``group_ids`` keeps each group on one rank."""
    costs = (cost_fn or token_cost)(lengths)
    if len(costs) != len(lengths):
        raise ValueError(f"cost_fn returned {len(costs)} costs for {len(lengths)} samples")
    return partition_balanced(costs, num_ranks, method, group_ids)


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    # Bool is not supported by every backend: ship as uint8.
    is_bool = x.dtype == torch.bool
    send = (x.to(torch.uint8) if is_bool else x).to(device).contiguous()
    recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv.bool() if is_bool else recv


def redistribute(batch: RolloutBatch, group: dist.ProcessGroup | None = None, method: str = "kk",
                 cost_fn: CostFn | None = None, keep_groups: bool = False) -> Redistributed:
    """Move samples between the ranks of ``group`` so each holds a cost-balanced share.

    ``keep_groups`` keeps every prompt group (``batch.group_ids``, globally unique) on one rank.
    Collective: every rank of ``group`` must call it with the same arguments.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if keep_groups and batch.group_ids is None:
        raise ValueError("keep_groups=True needs batch.group_ids")
    meta: dict[str, Any] = {
        "lengths": batch.seq_lens.tolist(),
        "groups": batch.group_ids.tolist() if batch.group_ids is not None else None,
        "fields": batch.present_fields(),
    }
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, meta, group=group)
    for r, m in enumerate(metas):
        if m["fields"] != meta["fields"]:
            raise ValueError(f"rank {r} sets fields {m['fields']} but rank {me} sets {meta['fields']}; "
                             "every rank must fill the same optional RolloutBatch fields")
    lengths = [n for m in metas for n in m["lengths"]]
    offsets = [0]
    for m in metas:
        offsets.append(offsets[-1] + len(m["lengths"]))
    groups = [g for m in metas for g in m["groups"]] if keep_groups else None
    assignment = plan_redistribution(lengths, world, method, cost_fn, groups)

    owner = [0] * len(lengths)
    for r, idx in enumerate(assignment):
        for g in idx:
            owner[g] = r
    # Send: my samples grouped by destination rank, ascending global index inside each.
    lo, hi = offsets[me], offsets[me + 1]
    send_local = [g - lo for r in range(world) for g in assignment[r] if lo <= g < hi]
    send_samples = [sum(1 for g in assignment[r] if lo <= g < hi) for r in range(world)]
    send_tokens = [sum(lengths[g] for g in assignment[r] if lo <= g < hi) for r in range(world)]
    mine = assignment[me]
    recv_samples = [sum(1 for g in mine if offsets[s] <= g < offsets[s + 1]) for s in range(world)]
    recv_tokens = [sum(lengths[g] for g in mine if offsets[s] <= g < offsets[s + 1]) for s in range(world)]

    ordered = batch.select(send_local)
    device = _comm_device(group)
    home = batch.input_ids.device

    def move_tok(x: torch.Tensor) -> torch.Tensor:
        return _all_to_all(x, send_tokens, recv_tokens, group, device).to(home)

    def move_seq(x: torch.Tensor) -> torch.Tensor:
        return _all_to_all(x, send_samples, recv_samples, group, device).to(home)

    lens_N = move_seq(ordered.seq_lens)
    cu = torch.zeros(lens_N.numel() + 1, dtype=torch.int64, device=home)
    cu[1:] = lens_N.cumsum(0)
    kw: dict[str, Any] = {"input_ids": move_tok(ordered.input_ids), "cu_seqlens": cu,
                          "loss_mask": move_tok(ordered.loss_mask)}
    for name in TOKEN_FIELDS:
        if (t := getattr(ordered, name)) is not None:
            kw[name] = move_tok(t)
    for name in SAMPLE_FIELDS:
        if (t := getattr(ordered, name)) is not None:
            kw[name] = move_seq(t)
    return Redistributed(RolloutBatch(**kw), list(mine), assignment)
