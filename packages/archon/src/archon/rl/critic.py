"""The value role (like AReaL's PPOCritic) on an engine with a value head.

The value head reads the hidden state after token t-1, so its output is shifted by one to be
token-aligned: ``values[t]`` is the value of the state in which token t is chosen (0 at sequence starts).
T: packed tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from archon_rl import RolloutBatch, ValueLoss, ValueLossConfig

from archon.engine.batch import PackedBatch
from archon.engine.logprobs import shift_to_tokens
from archon.engine.loss import token_separable
from archon.rl.actor import mean_stats
from archon.rl.convert import from_packed, minibatches, to_packed

__all__ = ["PPOCritic", "load_backbone_from_lm"]


def load_backbone_from_lm(model: Any, path: str) -> None:
    """Load everything but the value head (``score``) of ``model`` from an HF causal-LM checkpoint.

    The usual PPO critic init: the policy's (or a reward model's) backbone with a fresh scalar head.
    """
    from archon_ckpt import HFSource, SafetensorsReader, load_into_module

    from archon.spec import get_model_spec

    adapter = get_model_spec(model.args.model_type).state_dict_adapter(model.args)

    def native_to_hf(name: str):
        if name.startswith("score.") or adapter.is_native_only(name):
            return None
        keys, combine = adapter.hf_sources(name)
        return HFSource(tuple(keys), combine if len(keys) > 1 else None)

    load_into_module(model, SafetensorsReader(path), native_to_hf=native_to_hf, strict=False,
                     ignore_unexpected=[r"rotary_emb\.inv_freq$", r"^lm_head\.weight$"])


class PPOCritic:
    """Values and the (clipped) value-regression update over ``n_minibatches`` steps."""

    def __init__(self, engine: Any, loss: ValueLossConfig, *, n_minibatches: int = 1, seed: int = 0) -> None:
        if getattr(engine, "head", "value") != "value":
            raise ValueError("PPOCritic needs an engine built with head='value'")
        self.engine = engine
        self.loss = ValueLoss(loss)
        self.n_minibatches = n_minibatches
        self.seed = seed

    def compute_values(self, batch: RolloutBatch) -> torch.Tensor:
        """Token-aligned values [T] (no grad)."""
        return shift_to_tokens(self.engine.forward_batch(to_packed(batch))["values"], batch.cu_seqlens)

    def ppo_update(self, batch: RolloutBatch, step: int = 0) -> dict[str, float]:
        if batch.values is None or batch.returns is None:
            raise ValueError("the critic update needs batch.values and batch.returns (run GAE advantages first)")
        loss_fn = token_separable(self._loss_fn, self.loss.token_separable)
        rows = [self.engine.train_batch(to_packed(mb), loss_fn, self._loss_weight)
                for mb in minibatches(batch, self.n_minibatches, self.seed * 1_000_003 + step)]
        return {f"critic/{k}": v for k, v in mean_stats(rows).items()}

    def _loss_fn(self, outputs: dict[str, torch.Tensor], mb: PackedBatch):
        v_T = outputs["values"]
        values_T = shift_to_tokens(v_T, mb.cu_seqlens.to(v_T.device))
        return self.loss({"values": values_T}, from_packed(mb, v_T.device, trusted=True))  # built by to_packed

    def _loss_weight(self, mb: PackedBatch) -> float:
        return self.loss.loss_weight(from_packed(mb))
