"""DTA building blocks against naive references, config rules for tree modes, tree-aware DP balance.

Legend: N: tree tokens, B: blocks, Q: a block's tokens, C: cached ancestor tokens, H/G: heads / kv heads.
"""

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.config.validate import validate_engine
from archon.engine.batch import PackedBatch
from archon.tree import balance_for_tree, tree_balance
from archon_attn.tree import build_tree
from archon_attn.tree.dta import dta_schedule, prefix_attention
from archon_attn.tree.testing import mixed_batch
from archon_parallel.dims import ParallelDims


@pytest.mark.parametrize("block_size", [0, 1, 2, 5])
def test_dta_schedule_blocks_walk_every_path(block_size):
    tree = build_tree(mixed_batch(torch.Generator().manual_seed(1)))
    s = dta_schedule(tree, block_size)
    # blocks tile the tree tokens in order, each within the budget
    assert s.start_B[0] == 0 and torch.equal(s.start_B[1:], (s.start_B + s.length_B)[:-1])
    assert int(s.length_B.sum()) == tree.num_tree_tokens
    if block_size:
        assert int(s.length_B.max()) <= block_size
    # a block's first token hangs off its parent block's last token (or is a root)
    first_parent_B = tree.parent_N[s.start_B]
    parent_last_B = torch.where(s.parent_B >= 0, (s.start_B + s.length_B - 1)[s.parent_B.clamp(min=0)], -1)
    assert torch.equal(first_parent_B, parent_last_B)
    assert bool((s.parent_B < torch.arange(s.num_blocks)).all())  # parents come first (DFS pre-order)
    inside = torch.cat([torch.arange(a + 1, a + n) for a, n in zip(s.start_B.tolist(), s.length_B.tolist())])
    assert torch.equal(tree.parent_N[inside], inside - 1)  # a chain inside each block


def test_prefix_attention_equals_naive_and_grads_reach_cache():
    g = torch.Generator().manual_seed(0)
    C, Q, H, G, D = 5, 4, 4, 2, 8
    q, k, v = (torch.randn(Q, n, D, generator=g, dtype=torch.float64) for n in (H, G, G))
    kc, vc = (torch.randn(C, G, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    o = prefix_attention(q, k, v, kc, vc, scale=0.3)
    kk, vv = torch.cat([kc, k]).repeat_interleave(2, 1), torch.cat([vc, v]).repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * 0.3
    visible = torch.arange(C + Q)[None, :] <= torch.arange(Q)[:, None] + C
    ref = torch.einsum("hqk,khd->qhd", s.masked_fill(~visible, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(o, ref)
    o.sum().backward()
    assert kc.grad is not None and vc.grad.abs().sum() > 0
    torch.testing.assert_close(prefix_attention(q, k, v), prefix_attention(q, k, v, kc[:0], vc[:0]))


def _cfg(mode: str) -> ActorConfig:
    a = ActorConfig()
    a.archon.tree_training_mode = mode
    return a


@pytest.mark.parametrize(("alloc", "world", "rule"), [("archon:p2", 2, "tree-with-pp"),
                                                      ("archon:c2", 2, "tree-with-cp"),
                                                      ("archon:t2", 2, "tree-with-tp")])
def test_tree_modes_reject_incompatible_layouts(alloc, world, rule):
    dims = ParallelDims.from_allocation(alloc, world)
    for mode in ("sparse", "dta"):
        with pytest.raises(ValueError, match=rule):
            validate_engine(_cfg(mode), dims, torch.device("cpu"))
    validate_engine(_cfg("disabled"), ParallelDims.from_allocation("archon:d2", 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="tree_training_mode"):
        validate_engine(_cfg("dense"), ParallelDims.from_allocation("archon:d1", 1), torch.device("cpu"))


def test_balance_for_tree_partitions_and_keeps_groups():
    g = torch.Generator().manual_seed(3)
    groups = [torch.randint(0, 50, (8,), generator=g) for _ in range(4)]
    seqs = [torch.cat([p, torch.randint(0, 50, (int(n),), generator=g)]).tolist()
            for p in groups for n in torch.randint(1, 6, (3,), generator=g)]
    batch = PackedBatch.from_sequences(seqs)
    bal = tree_balance(batch, 2)
    got = sorted(i for r in bal.rank_sequences for i in r)
    assert got == list(range(len(seqs)))
    assert [len(r) for r in bal.rank_sequences] == [6, 6]  # two whole groups per rank
    mine = [balance_for_tree(batch, r, 2) for r in range(2)]
    assert sum(m.num_tokens for m in mine) == batch.num_tokens
    with pytest.raises(ValueError, match="dp_rank"):
        balance_for_tree(batch, 2, 2)
