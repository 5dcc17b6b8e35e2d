"""What both tree runners share: the micro-batch's trie, its output rows in the flat layout and the tree
metrics. (Tree-aware micro-batch planning, DFS order under a tree-token budget, is `archon.engine.micro_batches`.)

Legend: T: flat tokens of a micro-batch (token-aligned, like PackedBatch), N: tree tokens, R: output
rows (LM head: unique (parent, child) next-token pairs; value head: tree tokens), S: sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from archon_attn.tree import PackedTree, TreeCostModel, build_tree, tree_label_index
from archon_attn.tree.cost import SegmentStats

from archon.engine.batch import PackedBatch
from archon.engine.runner import Runner


@dataclass(frozen=True)
class TreeRows:
    """Model outputs computed once per tree row and read by every flat token that shares the row."""

    tree_index_R: torch.Tensor
    """int64 tree token whose final hidden state produces row r."""
    label_R: torch.Tensor | None
    """int64 next token scored by row r (LM head); None for a value head."""
    flat_row_T: torch.Tensor
    """int64 row read by each flat token (token-aligned); -1 where the output is 0 (sequence starts)."""

    @property
    def num_rows(self) -> int:
        return self.tree_index_R.numel()

    def to_flat(self, x_R: torch.Tensor) -> torch.Tensor:
        """Token-aligned [T] outputs; gradients of tokens that share a row add up in that row."""
        valid_T = self.flat_row_T >= 0
        return torch.where(valid_T, x_R[self.flat_row_T.clamp(min=0)], 0.0)


def tree_rows(tree: PackedTree, head: str) -> TreeRows:
    """Rows of an LM head (one per unique next-token pair) or a value head (one per tree token)."""
    if head == "value":
        return TreeRows(torch.arange(tree.num_tree_tokens, device=tree.device), None, tree.seq_index_T)
    labels = tree_label_index(tree)
    # flat_pair_T[p] predicts token p + 1; token-aligned outputs sit on that token. Rolling by one puts
    # each sequence's last-token -1 on the next sequence's start (and the last one's on token 0).
    flat_row_T = labels.flat_pair_T.roll(1)
    if labels.num_pairs == 0:  # only 1-token sequences: keep one dummy row so the head still runs
        zero = torch.zeros(1, dtype=torch.int64, device=tree.device)
        return TreeRows(zero, zero, flat_row_T)
    return TreeRows(labels.logit_index_P, labels.label_P, flat_row_T)


class TreeRunner(Runner):
    """Base of the tree runners: builds each micro-batch's trie (micro-batches are planned in DFS order under a
    tree-token budget, so sequences that share a prefix land in the same one) and counts flat vs tree tokens
    for the metrics."""

    def __init__(self, model: torch.nn.Module, *, dp_group=None, cost_model: TreeCostModel | None = None,
                 **kw) -> None:
        super().__init__(model, **kw)
        self.dp_group = dp_group
        args = getattr(model, "args", None)
        if cost_model is None and args is not None:
            cost_model = TreeCostModel.for_model(args.dim, args.ffn_dim, args.n_heads, args.head_dim,
                                                 args.n_kv_heads)
        self.cost_model = cost_model or TreeCostModel()
        self._counts = [0.0, 0.0, 0.0]  # flat tokens, tree tokens, predicted cost

    def build_tree(self, mb: PackedBatch) -> PackedTree:
        return build_tree(mb.sequences(), device=self.device)

    def count(self, tree: PackedTree, scale: float) -> None:
        if scale == 0.0:  # a padding micro-batch of a rank with fewer micro-batches than its peers
            return
        self._counts[0] += tree.num_tokens
        self._counts[1] += tree.num_tree_tokens
        self._counts[2] += self.cost_model(SegmentStats(tree.num_sequences, tree.num_tree_tokens,
                                                        tree.attention_pairs))  # counted on the host

    def pop_stats(self) -> dict[str, float]:
        """Flat and tree tokens summed over DP ranks, their ratio, and max / mean of per-rank predicted cost."""
        local = torch.tensor(self._counts, dtype=torch.float64)
        self._counts = [0.0, 0.0, 0.0]
        if self.dp_group is not None:
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            parts = [torch.zeros_like(local, device=dev) for _ in range(dist.get_world_size(self.dp_group))]
            dist.all_gather(parts, local.to(dev), group=self.dp_group)
            ranks = torch.stack(parts).cpu()
        else:
            ranks = local[None]
        flat, tree = float(ranks[:, 0].sum()), float(ranks[:, 1].sum())
        costs = ranks[:, 2]
        mean = float(costs.mean())
        return {
            "flat_tokens": flat,
            "tree_tokens": tree,
            "tree_compression": flat / tree if tree > 0 else 1.0,
            "tree_cost_imbalance": float(costs.max()) / mean if mean > 0 else 1.0,
        }
