"""The loss contract of `ArchonEngine.train_batch`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from archon.engine.batch import PackedBatch

__all__ = ["LossFn", "WeightFn", "token_separable"]

LossFn = Callable[[dict[str, torch.Tensor], PackedBatch], "torch.Tensor | tuple[torch.Tensor, dict]"]
WeightFn = Callable[[PackedBatch], "float | torch.Tensor"]


def token_separable(loss_fn: LossFn, separable: bool = True) -> LossFn:
    """``loss_fn`` marked as token-separable: d loss / d output of a token depends on that token's output alone
    (every per-token loss: SFT, PPO with token-level ratios, value regression; not GSPO's sequence ratios).
    Runners may then compute a part of the batch's gradients before the rest of its outputs exist (DTA skips
    its outputs pass), calling the loss more than once per micro-batch (keep it free of side effects).
    Marking a loss that is not separable gives wrong gradients."""
    marked = functools.partial(loss_fn)
    marked.token_separable = separable  # type: ignore[attr-defined]  # the flag runners read (getattr)
    return marked
