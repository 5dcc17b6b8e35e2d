"""Prefix trie over a batch of token sequences, flattened to one packed tree in DFS order.

Shared prefixes (a GRPO group's prompt, a multi-turn history) become one run of tree tokens that every
sharing sequence points to, so the model computes them once. The packed tree is a forest when the
batch has several distinct first tokens.

Legend: N: tree tokens (packed, DFS pre-order), T: flat tokens (every sequence concatenated in input
order), S: sequences, M: compressed trie nodes (maximal runs of tree tokens without a branch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedTree", "TrieNodes", "build_tree", "trie_nodes", "TokenSequences"]

TokenSequences = Sequence[torch.Tensor | Sequence[int]]


@dataclass(frozen=True)
class PackedTree:
    """A token trie flattened in DFS pre-order (ancestors always come before descendants).

    Tree token ``j`` is an ancestor-or-self of ``i`` iff ``j <= i < subtree_end_N[j]``. Original
    sequence ``s`` is ``tokens_N[seq_index_T[cu_seqlens[s]:cu_seqlens[s + 1]]]``, in input order.
    """

    tokens_N: torch.Tensor
    """int64 token id of each tree token."""
    parent_N: torch.Tensor
    """int64 tree index of the parent, -1 for roots."""
    depth_N: torch.Tensor
    """int64 depth (0 at roots) = the token's position id in every sequence that contains it."""
    subtree_end_N: torch.Tensor
    """int64 exclusive end of the token's subtree in DFS order."""
    seq_index_T: torch.Tensor
    """int64 tree index of every flat token, sequences concatenated in input order."""
    cu_seqlens: torch.Tensor
    """int64 [S + 1] offsets of each sequence in ``seq_index_T`` (the flat packed batch's offsets)."""
    host_pairs: int | None = None
    """`attention_pairs` counted on the host when the tree was built there (None: count on demand)."""

    @property
    def num_tree_tokens(self) -> int:
        return self.tokens_N.numel()

    @property
    def num_tokens(self) -> int:
        return self.seq_index_T.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.tokens_N.device

    @property
    def attention_pairs(self) -> int:
        """(query, ancestor-or-self key) pairs of tree attention: the sum of depth + 1. Counted when the tree is
        built on the host, so reading it from a device tree needs no device-to-host sync."""
        return self.host_pairs if self.host_pairs is not None else int((self.depth_N + 1).sum())

    def sequence_index(self, s: int) -> torch.Tensor:
        """Tree indices of sequence ``s``'s tokens, in order."""
        return self.seq_index_T[self.cu_seqlens[s] : self.cu_seqlens[s + 1]]

    def sequence(self, s: int) -> torch.Tensor:
        """Token ids of sequence ``s``, read back from the tree."""
        return self.tokens_N[self.sequence_index(s)]

    def to(self, device: torch.device | str) -> PackedTree:
        return PackedTree(**{f: getattr(self, f).to(device) for f in _FIELDS}, host_pairs=self.host_pairs)


_FIELDS = ("tokens_N", "parent_N", "depth_N", "subtree_end_N", "seq_index_T", "cu_seqlens")


def as_token_tensors(sequences: TokenSequences) -> list[torch.Tensor]:
    """Validate a batch of token sequences and return them as 1-D int64 CPU tensors."""
    if len(sequences) == 0:
        raise ValueError("the batch has no sequences; pass at least one token sequence")
    out = []
    for s, seq in enumerate(sequences):
        t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(list(seq), dtype=torch.int64)
        if t.dim() != 1:
            raise ValueError(f"sequence {s} has shape {tuple(t.shape)}; pass 1-D token id tensors or lists")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"sequence {s} has dtype {t.dtype}; token ids must be integers")
        if t.numel() == 0:
            raise ValueError(f"sequence {s} is empty; drop empty sequences before building the tree")
        out.append(t.detach().to("cpu", torch.int64))
    return out


@dataclass(frozen=True)
class SortedBatch:
    """Sequences in lexicographic order (a prefix sorts before its extensions) with adjacent LCPs."""

    order: torch.Tensor  # [S] original index of each sorted sequence
    lens_S: torch.Tensor  # [S] lengths, sorted order
    lcp_S: torch.Tensor  # [S] longest common prefix with the previous sorted sequence (0 for the first)
    flat_T: torch.Tensor  # [T] tokens, sorted order concatenated
    seq_of_T: torch.Tensor  # [T] sorted sequence of each flat token
    pos_T: torch.Tensor  # [T] position of each flat token in its sequence
    starts_S: torch.Tensor  # [S] offset of each sorted sequence in flat_T


def sort_batch(seqs: list[torch.Tensor]) -> SortedBatch:
    """Sort lexicographically and compute adjacent LCPs, vectorised over tokens.

    In this order the sequences sharing any prefix are contiguous, and emitting each sequence's tokens
    past its LCP yields the trie in DFS pre-order.
    """
    keys = [s.tolist() for s in seqs]  # list comparison is lexicographic, prefix first, in C
    order = sorted(range(len(seqs)), key=keys.__getitem__)
    order_t = torch.tensor(order, dtype=torch.int64)
    sorted_seqs = [seqs[i] for i in order]
    lens_S = torch.tensor([s.numel() for s in sorted_seqs], dtype=torch.int64)
    flat_T = torch.cat(sorted_seqs)
    S, T = lens_S.numel(), flat_T.numel()
    starts_S = torch.cumsum(lens_S, 0) - lens_S
    seq_of_T = torch.repeat_interleave(torch.arange(S), lens_S)
    pos_T = torch.arange(T) - starts_S[seq_of_T]
    prev_S = (torch.arange(S) - 1).clamp(min=0)
    has_prev_T = (seq_of_T > 0) & (pos_T < lens_S[prev_S][seq_of_T])
    prev_flat_T = torch.where(has_prev_T, starts_S[prev_S][seq_of_T] + pos_T, 0)
    mismatch_T = ~(has_prev_T & (flat_T[prev_flat_T] == flat_T))
    lcp_S = lens_S.clone().scatter_reduce_(0, seq_of_T[mismatch_T], pos_T[mismatch_T], "amin")
    return SortedBatch(order_t, lens_S, lcp_S, flat_T, seq_of_T, pos_T, starts_S)


def build_tree(sequences: TokenSequences, *, device: torch.device | str | None = None) -> PackedTree:
    """Build the prefix trie of a batch of token sequences and flatten it in DFS pre-order.

    Sequences that are prefixes of others end inside the tree; duplicates share every token. Cost is
    one lexicographic sort plus O(T log S) vectorised tensor work.
    """
    sb = sort_batch(as_token_tensors(sequences))
    T = sb.flat_T.numel()
    new_T = sb.pos_T >= sb.lcp_S[sb.seq_of_T]  # first occurrence of this trie token in sorted order
    # A shared token points to the same position in the previous sequence; pointer jumping resolves the
    # chain to the sequence that emitted it in O(log S) vectorised steps.
    prev_flat_T = sb.starts_S[(sb.seq_of_T - 1).clamp(min=0)] + sb.pos_T
    src_T = torch.where(new_T, torch.arange(T), prev_flat_T)
    while True:
        nxt_T = src_T[src_T]
        if torch.equal(nxt_T, src_T):
            break
        src_T = nxt_T
    tree_idx_T = (torch.cumsum(new_T, 0) - 1)[src_T]  # sorted flat token -> tree index

    new_pos = new_T.nonzero().squeeze(1)
    tokens_N = sb.flat_T[new_pos]
    depth_N = sb.pos_T[new_pos]
    parent_N = torch.where(depth_N > 0, tree_idx_T[(new_pos - 1).clamp(min=0)], -1)
    # Every tree token lies on the path of the sequences through it; its subtree ends right after the
    # last token of the last such sequence (sequences' last tokens are the deepest on their paths).
    last_S = tree_idx_T[sb.starts_S + sb.lens_S - 1]
    subtree_end_N = torch.zeros_like(tokens_N).scatter_reduce_(0, tree_idx_T, last_S[sb.seq_of_T] + 1, "amax")

    rank_S = torch.empty_like(sb.order)
    rank_S[sb.order] = torch.arange(sb.order.numel())
    lens_orig_S = sb.lens_S[rank_S]
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lens_orig_S, 0), (1, 0))
    orig_seq_T = torch.repeat_interleave(torch.arange(lens_orig_S.numel()), lens_orig_S)
    orig_pos_T = torch.arange(T) - cu_seqlens[orig_seq_T]
    seq_index_T = tree_idx_T[sb.starts_S[rank_S[orig_seq_T]] + orig_pos_T]
    tree = PackedTree(tokens_N, parent_N, depth_N, subtree_end_N, seq_index_T, cu_seqlens,
                      host_pairs=int((depth_N + 1).sum()))  # host tensors here: no device read
    return tree if device is None else tree.to(device)


@dataclass(frozen=True)
class TrieNodes:
    """Compressed view of a packed tree: each node is a contiguous run of tree tokens."""

    start_M: torch.Tensor
    """int64 first tree index of each node."""
    length_M: torch.Tensor
    """int64 number of tree tokens in each node."""
    parent_M: torch.Tensor
    """int64 parent node, -1 for roots."""
    node_of_N: torch.Tensor
    """int64 node of each tree token."""
    end_node_S: torch.Tensor
    """int64 node where each sequence ends (an internal node when it is a prefix of another)."""

    @property
    def num_nodes(self) -> int:
        return self.start_M.numel()


def trie_nodes(tree: PackedTree) -> TrieNodes:
    """Compress a packed tree into nodes that split at branches and at sequence ends."""
    N = tree.num_tree_tokens
    parent_N = tree.parent_N
    has_parent_N = parent_N >= 0
    num_children_N = torch.bincount(parent_N[has_parent_N], minlength=N)
    last_T = tree.cu_seqlens[1:] - 1
    is_end_N = torch.zeros(N, dtype=torch.bool, device=tree.device)
    is_end_N[tree.seq_index_T[last_T]] = True
    p_N = parent_N.clamp(min=0)
    # A single child of a non-ending token follows it directly in pre-order, so nodes are contiguous.
    starts_N = ~has_parent_N | (num_children_N[p_N] > 1) | is_end_N[p_N]
    node_of_N = torch.cumsum(starts_N, 0) - 1
    start_M = starts_N.nonzero().squeeze(1)
    length_M = torch.diff(start_M, append=torch.tensor([N], device=tree.device))
    parent_M = torch.where(has_parent_N[start_M], node_of_N[p_N[start_M]], -1)
    return TrieNodes(start_M, length_M, parent_M, node_of_N, node_of_N[tree.seq_index_T[last_T]])
