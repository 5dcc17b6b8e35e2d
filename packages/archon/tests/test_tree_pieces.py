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


def test_prefix_attention_packed_siblings_equals_naive():
    """Siblings packed in one call each see the whole cache and causally themselves, never each other; the cache
    grads sum over siblings. Reference: one float64 masked softmax over [cache; all packed tokens]."""
    g = torch.Generator().manual_seed(3)
    C, segs, H, G, D = 6, [3, 1, 5], 4, 2, 8
    Q = sum(segs)
    q, k, v, kc, vc = (torch.randn(n, h, D, generator=g, dtype=torch.float64, requires_grad=True)
                       for n, h in ((Q, H), (Q, G), (Q, G), (C, G), (C, G)))
    o = prefix_attention(q, k, v, kc, vc, scale=0.3, seg_lens=segs)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(segs))
    pos = torch.arange(Q)
    visible = torch.cat([torch.ones(Q, C, dtype=torch.bool), (doc[:, None] == doc[None]) & (pos[None] <= pos[:, None])], 1)
    kk, vv = torch.cat([kc, k]).repeat_interleave(2, 1), torch.cat([vc, v]).repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * 0.3
    ref = torch.einsum("hqk,khd->qhd", s.masked_fill(~visible, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(o, ref)
    w = torch.randn(Q, H, D, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((o * w).sum(), (q, k, v, kc, vc))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, kc, vc))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="sum to"):
        prefix_attention(q, k, v, kc, vc, seg_lens=[3, 1])


@pytest.mark.parametrize("budget", [0, 4, 9])
def test_dta_units_pack_sibling_leaves_under_the_budget(budget):
    from archon.tree.dta_runner import _units

    # one shared prompt with four leaf answers (lengths 2, 3, 4, 1), plus a sequence of its own (a root leaf)
    prompt = [7, 8, 9]
    seqs = [prompt + [1, 2], prompt + [3, 4, 5], prompt + [6, 6, 6, 6], prompt + [5], [11, 12, 13]]
    tree = build_tree([torch.tensor(x) for x in seqs])
    sched = dta_schedule(tree, 0)
    units = _units(sched, [torch.empty(0, dtype=torch.int64)] * sched.num_blocks, budget)
    leaves = [u for u in units if u.parent >= 0]
    assert [u.internal for u in units].count(True) == 1 and units[0].internal and units[0].seg_lens == [3]
    assert sorted(n for u in leaves for n in u.seg_lens) == [1, 2, 3, 4]  # every answer exactly once
    assert all(u.parent == 0 and not u.internal for u in leaves)
    if budget:
        assert all(u.length <= budget for u in leaves)
    assert len(leaves) == {0: 1, 4: 3, 9: 2}[budget]  # DFS order of the answers is 2, 3, 1, 4 tokens


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


@pytest.mark.parametrize(("budget", "want"), [(0, [([7], False, -1)]),
                                               (4, [([3], True, -1), ([4], False, 0)]),
                                               (5, [([5], True, -1), ([2], False, 0)])])
def test_dta_units_merge_single_child_chains(budget, want):
    """Multi-turn history: each turn ends a sequence, so the trie is a chain of nodes; a unit is one causal run of
    the chain up to the budget, and a cut chain's first part is internal (the rest attends to its K/V)."""
    from archon.tree.dta_runner import _units

    seqs = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 2, 3, 4, 5, 6, 7])]
    sched = dta_schedule(build_tree(seqs), 0)
    assert sched.length_B.tolist() == [3, 2, 2]
    units = _units(sched, [torch.empty(0, dtype=torch.int64)] * sched.num_blocks, budget)
    assert [(u.seg_lens, u.internal, u.parent) for u in units] == want
    assert [u.start for u in units] == [0, *([want[0][0][0]] if len(want) > 1 else [])]


def test_dta_compile_resolution():
    """dta compiles like the other modes (on by default on CUDA, config logic: no GPU needed), with dynamic graphs
    that are not fullgraph (its blocks break the graph at the KV hook); the other modes keep fullgraph."""
    from archon.config.validate import compile_enabled
    from archon.engine.build import block_compile_config

    d1 = ParallelDims.from_allocation("archon:d1", 1)
    cuda = torch.device("cuda")
    validate_engine(_cfg("dta"), d1, torch.device("cpu"))
    for mode in ("disabled", "sparse", "dta"):
        assert compile_enabled(_cfg(mode), cuda) and not compile_enabled(_cfg(mode), torch.device("cpu"))
    c = block_compile_config(_cfg("dta"), d1, cuda)
    assert c.enabled and not c.fullgraph and c.dynamic is True
    c = block_compile_config(_cfg("sparse"), d1, cuda)
    assert c.fullgraph and c.dynamic is None


def test_sibling_key_index_lays_out_cache_then_own_tokens():
    """The CUDA packed-sibling path gathers keys [cache; own] per sibling from [cache; all packed tokens]."""
    from archon_attn.tree.dta import _sibling_key_index

    idx = _sibling_key_index(2, (3, 1), torch.device("cpu"))
    assert idx.tolist() == [0, 1, 2, 3, 4, 0, 1, 5]
    assert _sibling_key_index(0, (2,), torch.device("cpu")).tolist() == [0, 1]


def test_segment_bounds_for_packed_flash_prefix_attention():
    """cu_q / cu_k of the packed-sibling flash call: cumulative query and key counts per document."""
    from archon_attn.varlen import _segment_bounds

    cu_q, cu_k = _segment_bounds((3, 1), (5, 3), torch.device("cpu"))
    assert cu_q.tolist() == [0, 3, 4] and cu_k.tolist() == [0, 5, 8]
    assert cu_q.dtype == cu_k.dtype == torch.int32
