"""`actor.mb_max_tokens` and how every runner turns it into micro-batches, in one place.

`mb_max_tokens` means one thing: the tokens of one micro-batch on one rank. `MicroBatchBudget.from_config` is
the only place that converts it for a layout, and `MicroBatchBudget.plan` the only planner the engine calls:

- flat runner: micro-batches of at most `mb_max_tokens` tokens (whole sequences); with `pad_to_maximum` each is
  padded to exactly that many (`pad_to_tokens`);
- context parallel (c>1): a micro-batch holds cp x `mb_max_tokens` tokens of whole sequences, which the cp ranks
  split, so each rank still holds the budget;
- tree modes (`tree_training_mode: sparse | dta`): the budget counts tree tokens (each shared prefix once),
  and micro-batches are runs of sequences in DFS order, so sequences sharing a prefix stay together;
- pipeline (p>1): micro-batches as flat, but at least `pp_microbatches` (default 2 x pp) of them and a
  multiple of pp, which every schedule accepts.

The rules that forbid combinations (tree with cp or pp, padding outside the flat runner, cp with pp) live in
`archon.config.validate`; this module assumes a validated config.
"""

from __future__ import annotations

from dataclasses import dataclass

from archon.engine.batch import PackedBatch
from archon_attn.tree import pack_tree_microbatches
from archon_rl import plan_micro_batches


@dataclass(frozen=True)
class MicroBatchBudget:
    """`actor.mb_max_tokens` in the units of this engine's runner."""

    max_tokens: int
    """Tokens (tree tokens with `tree_tokens`) of one planned micro-batch, before the cp ranks split it."""
    tree_tokens: bool = False
    """Count tree tokens and keep DFS order (tree training modes) instead of packing by flat tokens."""
    min_count: int = 1
    """Fewest micro-batches per step (pipeline: enough to fill the schedule)."""
    count_multiple: int = 1
    """The number of micro-batches is rounded up to a multiple of this (pipeline: pp)."""
    pad_to_tokens: int | None = None
    """`pad_to_maximum`: every micro-batch padded to this many tokens (flat runner only), else None."""

    @classmethod
    def from_config(cls, cfg, dims) -> MicroBatchBudget:
        """The budget of an engine with ActorConfig `cfg` on `archon_parallel.ParallelDims` `dims`."""
        a = cfg.archon
        mb = cfg.mb_max_tokens
        if dims.pp > 1:
            first = max(a.pp_microbatches or 2 * dims.pp, dims.pp)
            return cls(mb, min_count=first, count_multiple=dims.pp)
        return cls(mb * dims.cp, tree_tokens=a.tree_training_mode != "disabled",
                   pad_to_tokens=mb if a.pad_to_maximum else None)

    def plan(self, batch: PackedBatch, num_micro_batches: int | None = None) -> list[list[int]]:
        """Sequence indices of each micro-batch of `batch`; with `num_micro_batches` (the most any data-parallel
        rank planned) padded with empty lists (padding micro-batches) to that count."""
        if self.tree_tokens:
            plan = [m.seq_ids for m in pack_tree_microbatches(batch.sequences(), self.max_tokens)]
            if num_micro_batches is not None:
                plan += [[] for _ in range(num_micro_batches - len(plan))]
            return plan
        lengths = batch.lengths.tolist()
        if self.min_count > 1 or self.count_multiple > 1:
            n = len(plan_micro_batches(lengths, self.max_tokens)) if num_micro_batches is None else num_micro_batches
            n = max(n, self.min_count)
            num_micro_batches = -(-n // self.count_multiple) * self.count_multiple
        return plan_micro_batches(lengths, self.max_tokens, num_micro_batches=num_micro_batches)
