"""Trie / PackedTree / packing against brute-force references (distinct prefixes, naive subtrees)."""

import pytest
import torch
from archon_attn.tree import (
    PackedTree,
    build_tree,
    merge_trees,
    pack_tree_microbatches,
    tree_stats,
    trie_nodes,
)
from archon_attn.tree.testing import grpo_batch, mixed_batch, multiturn_batch
from hypothesis import given, settings
from hypothesis import strategies as st


def _distinct_prefixes(seqs) -> set[tuple[int, ...]]:
    return {tuple(s[: k + 1]) for s in seqs for k in range(len(s))}


def _naive_subtree_end(parent: list[int]) -> list[int]:
    end = [i + 1 for i in range(len(parent))]
    for i in range(len(parent)):  # every ancestor's subtree reaches at least i + 1
        p = parent[i]
        while p >= 0:
            end[p] = max(end[p], i + 1)
            p = parent[p]
    return end


def check_tree(tree: PackedTree, seqs: list[list[int]]) -> None:
    """Every invariant of a packed tree against references computed from the raw sequences."""
    assert tree.num_sequences == len(seqs)
    assert tree.num_tokens == sum(len(s) for s in seqs)
    for i, s in enumerate(seqs):
        assert tree.sequence(i).tolist() == s
    prefixes = _distinct_prefixes(seqs)
    assert tree.num_tree_tokens == len(prefixes)
    # Each tree token is exactly one distinct prefix: its path from the root spells it.
    parent, tokens, depth = tree.parent_N.tolist(), tree.tokens_N.tolist(), tree.depth_N.tolist()
    paths = []
    for j in range(tree.num_tree_tokens):
        assert parent[j] < j  # DFS pre-order: ancestors first
        path = (tokens[j],) if parent[j] < 0 else paths[parent[j]] + (tokens[j],)
        assert len(path) == depth[j] + 1
        paths.append(path)
    assert set(paths) == prefixes and len(set(paths)) == len(paths)
    assert tree.subtree_end_N.tolist() == _naive_subtree_end(parent)
    for i, s in enumerate(seqs):
        idx = tree.sequence_index(i).tolist()
        assert [paths[j] for j in idx] == [tuple(s[: k + 1]) for k in range(len(s))]
    st_ = tree_stats(tree)
    assert st_.tree_attn_pairs == sum(len(p) for p in prefixes)
    assert st_.flat_attn_pairs == sum(len(s) * (len(s) + 1) // 2 for s in seqs)
    assert st_.compression_ratio == pytest.approx(tree.num_tokens / len(prefixes))


def _as_lists(seqs) -> list[list[int]]:
    return [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in seqs]


CASES = {
    "grpo": lambda g: grpo_batch(g, 3, 4, 6, 5),
    "multiturn": lambda g: multiturn_batch(g, 2, 4, 3),
    "mixed": mixed_batch,
    "no_sharing": lambda g: [torch.randint(0, 50, (5,), generator=g) + 100 * i for i in range(5)],
    "prefix_and_duplicates": lambda g: [[1, 2, 3], [1, 2], [1, 2, 3], [1], [1, 2, 3, 4], [1, 2]],
    "single_tokens": lambda g: [[5], [5], [6]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tree_matches_brute_force(case):
    seqs = _as_lists(CASES[case](torch.Generator().manual_seed(0)))
    check_tree(build_tree(seqs), seqs)


def test_grpo_shares_the_prompt_once():
    g = torch.Generator().manual_seed(1)
    seqs = grpo_batch(g, num_groups=2, group_size=8, prompt_len=20, max_resp=3)
    tree = build_tree(seqs)
    assert tree.num_tree_tokens <= 2 * 20 + sum(len(s) - 20 for s in seqs)
    assert tree_stats(tree).compression_ratio > 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=7), min_size=1, max_size=9))
def test_tree_property(seqs):
    check_tree(build_tree(seqs), seqs)


def _naive_compressed_nodes(seqs) -> int:
    """Compressed-trie node count: distinct prefixes that start a node (root, branch, or after an end)."""
    prefixes = _distinct_prefixes(seqs)
    ends = {tuple(s) for s in seqs}
    children: dict[tuple, int] = {}
    for p in prefixes:
        children[p[:-1]] = children.get(p[:-1], 0) + 1
    return sum(1 for p in prefixes if len(p) == 1 or children[p[:-1]] > 1 or p[:-1] in ends)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trie_nodes(case):
    seqs = _as_lists(CASES[case](torch.Generator().manual_seed(2)))
    tree = build_tree(seqs)
    nodes = trie_nodes(tree)
    assert nodes.num_nodes == _naive_compressed_nodes(seqs)
    assert int(nodes.length_M.sum()) == tree.num_tree_tokens
    tokens = tree.tokens_N.tolist()
    for i, s in enumerate(seqs):  # the node path from the end node back to a root spells the sequence
        m, parts = int(nodes.end_node_S[i]), []
        while m >= 0:
            a, n = int(nodes.start_M[m]), int(nodes.length_M[m])
            parts.insert(0, tokens[a : a + n])
            m = int(nodes.parent_M[m])
        assert sum(parts, []) == s


def test_input_errors():
    with pytest.raises(ValueError, match="no sequences"):
        build_tree([])
    with pytest.raises(ValueError, match="empty"):
        build_tree([[1], []])
    with pytest.raises(ValueError, match="1-D"):
        build_tree([torch.zeros(2, 2, dtype=torch.long)])
    with pytest.raises(TypeError, match="integers"):
        build_tree([torch.zeros(3)])


def test_pack_microbatches_and_merge():
    g = torch.Generator().manual_seed(3)
    seqs = _as_lists(grpo_batch(g, 4, 3, 8, 6) + multiturn_batch(g, 2, 3, 4) + mixed_batch(g))
    budget = 40
    mbs = pack_tree_microbatches(seqs, budget)
    ids = [i for mb in mbs for i in mb.seq_ids]
    assert sorted(ids) == list(range(len(seqs)))
    assert ids == sorted(range(len(seqs)), key=lambda i: seqs[i])  # contiguous in DFS order
    for mb in mbs:
        assert mb.tree.num_tree_tokens <= budget
        check_tree(mb.tree, [seqs[i] for i in mb.seq_ids])
    for a, b in zip(mbs, mbs[1:]):  # greedy: the next sequence would not have fit
        extra = seqs[b.seq_ids[0]]
        assert len(_distinct_prefixes([seqs[i] for i in a.seq_ids] + [extra])) > budget
    forest = merge_trees([mb.tree for mb in mbs])
    check_tree(forest, [seqs[i] for i in ids])
    with pytest.raises(ValueError, match="exceeds max_tree_tokens"):
        pack_tree_microbatches(seqs, 3)


@pytest.mark.parametrize("case", ["grpo", "multiturn", "mixed"])
def test_attention_pairs_counted_on_the_host(case):
    """A built tree carries its attention-pair count (sum over distinct prefixes of their length, i.e. every
    tree token times its ancestors-or-self); a moved tree keeps it; a tree without it counts on demand."""
    g = torch.Generator().manual_seed(4)
    seqs = {"grpo": lambda: grpo_batch(g, 3, 4, 9, 6), "multiturn": lambda: multiturn_batch(g, 3, 3, 5),
            "mixed": lambda: mixed_batch(g)}[case]()
    lists = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in seqs]
    want = sum(len(p) for p in _distinct_prefixes(lists))
    tree = build_tree(seqs)
    assert tree.host_pairs == want and tree.to("cpu").host_pairs == want
    bare = PackedTree(tree.tokens_N, tree.parent_N, tree.depth_N, tree.subtree_end_N, tree.seq_index_T,
                      tree.cu_seqlens)
    assert bare.host_pairs is None and bare.attention_pairs == want == tree_stats(tree).tree_attn_pairs
