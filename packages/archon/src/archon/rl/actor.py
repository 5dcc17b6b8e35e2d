"""The policy role (like AReaL's PPOActor), engine-agnostic: anything with ``forward_batch`` /
``train_batch`` over PackedBatch and a ``dp_group`` works.

T: packed tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from archon_rl import AdvantageConfig, PPOLossConfig, PPOPolicyLoss, RolloutBatch, compute_advantages

from archon.engine.batch import PackedBatch
from archon.engine.loss import token_separable
from archon.rl.convert import from_packed, minibatches, to_packed

__all__ = ["PPOActor", "mean_stats"]


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over the rows that have it."""
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in sorted(keys)}


class PPOActor:
    """Logprobs, advantages and the clipped PPO update of the policy over ``n_minibatches`` steps."""

    def __init__(self, engine: Any, loss: PPOLossConfig, advantage: AdvantageConfig, *, n_minibatches: int = 1,
                 recompute_logprobs: bool = False, seed: int = 0) -> None:
        self.engine = engine
        self.loss = PPOPolicyLoss(loss)
        self.advantage = advantage
        self.advantage.validate()
        self.n_minibatches = n_minibatches
        self.recompute_logprobs = recompute_logprobs
        self.seed = seed

    def compute_logp(self, batch: RolloutBatch) -> torch.Tensor:
        """Token-aligned logprobs [T] of the current policy (no grad)."""
        return self.engine.forward_batch(to_packed(batch))["logprobs"]

    def prepare(self, batch: RolloutBatch, *, ref_logprobs: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> RolloutBatch:
        """Fill in the old logprobs (if recomputed), reference logprobs, values, then advantages."""
        changes: dict[str, torch.Tensor] = {}
        if self.recompute_logprobs or batch.logprobs is None:
            changes["logprobs"] = self.compute_logp(batch)
        if ref_logprobs is not None:
            changes["ref_logprobs"] = ref_logprobs
        if values is not None:
            changes["values"] = values
        if changes:
            batch = batch.replace(**changes)
        return compute_advantages(batch, self.advantage, kl=self.loss.config.kl, group=self.engine.dp_group)

    def ppo_update(self, batch: RolloutBatch, step: int = 0) -> dict[str, float]:
        """One optimizer step per minibatch; returns stats averaged over the minibatches."""
        loss_fn = token_separable(self._loss_fn, self.loss.token_separable)
        rows = [self.engine.train_batch(to_packed(mb), loss_fn, self._loss_weight)
                for mb in minibatches(batch, self.n_minibatches, self.seed * 1_000_003 + step)]
        return mean_stats(rows)

    def _loss_fn(self, outputs: dict[str, torch.Tensor], mb: PackedBatch):
        return self.loss(outputs, from_packed(mb, outputs["logprobs"].device, trusted=True))  # built by to_packed

    def _loss_weight(self, mb: PackedBatch) -> float:
        return self.loss.loss_weight(from_packed(mb))
