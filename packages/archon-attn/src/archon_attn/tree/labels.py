"""Model inputs and next-token labels of a packed tree, laid out like the flat packed batch.

Every non-root tree token ``c`` is predicted exactly once, by the logits at its parent: the pair
(parent[c], tokens[c]). Sequences that share ``c`` share the pair; sequences that branch after a shared
token use different children, i.e. different pairs read from the same logits row. A flat position
``p`` of sequence ``s`` (same order and cu_seqlens as the flat batch) predicts token ``p + 1`` of ``s``,
which is tree token ``seq_index_T[p + 1]``.

Legend: N: tree tokens, T: flat tokens, P: predicted pairs (non-root tree tokens), V: vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from archon_attn.tree.trie import PackedTree

__all__ = ["TreeLabels", "tree_model_inputs", "tree_label_index", "gather_tree_logprobs"]


def tree_model_inputs(tree: PackedTree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids_N, position_ids_N)``: tree tokens and their depths (= positions in each sequence)."""
    return tree.tokens_N, tree.depth_N


@dataclass(frozen=True)
class TreeLabels:
    """Where each next-token prediction of the flat batch lives in the tree."""

    logit_index_P: torch.Tensor
    """int64 tree index whose logits predict pair p (the parent of the target)."""
    label_P: torch.Tensor
    """int64 target token id of pair p."""
    flat_pair_T: torch.Tensor
    """int64 pair predicted at each flat position (token p + 1 of its sequence); -1 at each last token."""
    flat_labels_T: torch.Tensor
    """int64 next token at each flat position, ``ignore_index`` at each sequence's last token."""
    cu_seqlens: torch.Tensor
    """int64 [S + 1] the flat batch's sequence offsets."""

    @property
    def num_pairs(self) -> int:
        return self.label_P.numel()


def tree_label_index(tree: PackedTree, ignore_index: int = -100) -> TreeLabels:
    """Unique (logits row, label) pairs of the tree plus their placement in the flat batch."""
    T = tree.num_tokens
    nonroot_N = tree.parent_N >= 0
    target_P = nonroot_N.nonzero().squeeze(1)
    pair_of_N = torch.cumsum(nonroot_N, 0) - 1
    is_last_T = torch.zeros(T, dtype=torch.bool, device=tree.device)
    is_last_T[tree.cu_seqlens[1:] - 1] = True
    next_T = tree.seq_index_T.roll(-1)  # tree index of the next flat token (garbage at last tokens)
    flat_pair_T = torch.where(is_last_T, -1, pair_of_N[next_T])
    flat_labels_T = torch.where(is_last_T, ignore_index, tree.tokens_N[next_T])
    return TreeLabels(
        tree.parent_N[target_P], tree.tokens_N[target_P], flat_pair_T, flat_labels_T, tree.cu_seqlens
    )


def gather_tree_logprobs(
    logits: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    labels: TreeLabels,
    *,
    chunk_size: int = 4096,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Next-token logprobs in the flat layout: position p holds log p(token p+1 | prefix), 0 at last tokens.

    ``logits`` is either [N, V] tree logits or a function mapping tree indices [n] to logits [n, V] (for
    example hidden states gathered then the LM head), so only ``chunk_size`` rows are in fp32 at once.
    Each shared pair is computed once and broadcast to every sequence that contains it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows_fn = (lambda idx: logits[idx]) if isinstance(logits, torch.Tensor) else logits
    chunks = []
    for start in range(0, labels.num_pairs, chunk_size):
        idx = labels.logit_index_P[start : start + chunk_size]
        rows_PV = rows_fn(idx).float() / temperature
        picked_P = rows_PV.gather(1, labels.label_P[start : start + chunk_size, None]).squeeze(1)
        chunks.append(picked_P - torch.logsumexp(rows_PV, dim=-1))
    valid_T = labels.flat_pair_T >= 0
    if not chunks:  # every sequence has a single token: nothing to predict
        return torch.zeros(valid_T.shape, device=valid_T.device)
    lp_P = torch.cat(chunks)
    return torch.where(valid_T, lp_P[labels.flat_pair_T.clamp(min=0)], 0.0)
