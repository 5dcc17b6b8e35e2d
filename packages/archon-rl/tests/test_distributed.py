"""Two gloo ranks: redistribution moves the right samples, whitening and micro-batch counts agree."""

import importlib.util
import os

import torch
import torch.distributed as dist
from archon_parallel.testing import run_ranks
from archon_rl import (
    RolloutBatch,
    attention_cost,
    masked_whiten,
    partition_balanced,
    redistribute,
    sync_num_micro_batches,
)

CASES = [("kk", None, False), ("ffd", None, False), ("kk", None, True), ("ffd", "attn", True)]


def _global_batch():
    spec = importlib.util.spec_from_file_location("_rl_conftest", os.path.join(os.path.dirname(__file__),
                                                                               "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lens = [30, 2, 9, 1, 17, 4, 25, 3, 8, 8, 12, 1, 40, 6]
    return mod._make(seed=21, lens=lens, dtype=torch.float32, group_size=2)


def _local(rank):
    # Uneven start: rank 0 holds 10 samples, rank 1 holds 4.
    g = _global_batch()
    return g.select(range(0, 10) if rank == 0 else range(10, 14))


def _worker(rank, world_size):
    local = _local(rank)
    out = []
    for method, cost, keep in CASES:
        res = redistribute(local, method=method, cost_fn=attention_cost(0.05) if cost else None, keep_groups=keep)
        out.append((res.global_indices, res.assignment, {n: getattr(res.batch, n) for n in
                    ["input_ids", "cu_seqlens", "loss_mask"] + res.batch.present_fields()}))
    # Everything starts on rank 0; rank 1 holds an empty batch.
    start = _global_batch() if rank == 0 else _global_batch().select([])
    res = redistribute(start, method="kk")
    out.append((res.global_indices, res.assignment, {"input_ids": res.batch.input_ids}))
    whitened = masked_whiten(local.values, local.loss_mask, group=dist.group.WORLD)
    n_mb = sync_num_micro_batches(3 + rank)
    return out, whitened, n_mb


def test_redistribute_two_ranks():
    results = run_ranks(_worker, 2, timeout=120)
    g = _global_batch()
    lengths = g.seq_lens.tolist()
    for c, (method, cost, keep) in enumerate(CASES):
        # Independent check of the assignment: same inputs to the pure partitioner give the same plan.
        costs = attention_cost(0.05)(lengths) if cost else [float(n) for n in lengths]
        expect = partition_balanced(costs, 2, method, g.group_ids.tolist() if keep else None)
        held = []
        for rank in range(2):
            idx, assignment, fields = results[rank][0][c]
            assert assignment == expect and idx == expect[rank]
            ref = g.select(idx)
            for name, t in fields.items():
                assert torch.equal(t, getattr(ref, name)), (method, rank, name)
            held += idx
        assert sorted(held) == list(range(g.num_seqs))  # union is the input, nothing duplicated
        if keep:
            owner = {i: r for r in range(2) for i in expect[r]}
            for gid in set(g.group_ids.tolist()):
                assert len({owner[i] for i in range(g.num_seqs) if g.group_ids[i] == gid}) == 1
    held = [results[r][0][len(CASES)][0] for r in range(2)]
    assert sorted(held[0] + held[1]) == list(range(g.num_seqs)) and held[0] and held[1]
    for r in range(2):
        assert torch.equal(results[r][0][len(CASES)][2]["input_ids"], g.select(held[r]).input_ids)
    # Whitening across ranks equals whitening of the concatenated batch in one process.
    full = masked_whiten(g.values, g.loss_mask)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), full, atol=1e-5, rtol=1e-5)
    assert [r[2] for r in results] == [4, 4]


def test_redistribute_is_not_a_noop():
    # Sanity of the setup: the start breaks the balance bound (max - min <= largest sample), so the
    # balanced assignment must differ from it and samples must actually move.
    g = _global_batch()
    loads = [int(_local(r).num_tokens) for r in range(2)]
    assert abs(loads[0] - loads[1]) > max(g.seq_lens.tolist())
    assert isinstance(_local(0), RolloutBatch)
