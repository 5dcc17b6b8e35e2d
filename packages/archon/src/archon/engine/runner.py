"""How one micro-batch runs through the model: the strategy objects behind `forward_batch` / `train_batch`.

The engine calls `runner.forward(mb, want_entropy)` and `runner.forward_backward(mb, loss_fn, scale, ...)`
and never asks which runner it holds. `FlatRunner` runs the packed batch as is; tree modes (prefix sharing)
and pipeline schedules provide their own runners with the same interface.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch

from archon.engine.batch import PackedBatch
from archon.engine.logprobs import next_token_labels, shift_to_tokens


class Runner:
    """Interface. `forward` returns token-aligned outputs; `forward_backward` also back-propagates
    `loss_fn(outputs, mb) * scale` (+ the MoE aux loss weighted by `aux_scale`) and returns the loss value."""

    def __init__(self, model: torch.nn.Module, *, head: str, device: torch.device,
                 autocast: Callable[[], AbstractContextManager], logprob_chunk_size: int = 4096) -> None:
        self.model = model
        self.head = head
        self.device = device
        self.autocast = autocast
        self.chunk = logprob_chunk_size

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plan_micro_batches(self, batch: PackedBatch, max_tokens: int, num_micro_batches: int | None = None
                           ) -> list[list[int]]:
        """Sequence indices of each micro-batch (an empty list is a padding micro-batch)."""
        from archon_rl import plan_micro_batches

        return plan_micro_batches(batch.lengths.tolist(), max_tokens, num_micro_batches=num_micro_batches)

    def pop_stats(self) -> dict[str, float]:
        """Counters accumulated by `forward_backward` since the last call (same on every DP rank)."""
        return {}

    def forward_backward(self, mb: PackedBatch, loss_fn, scale: float, aux_scale: float, want_entropy: bool = True
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.forward(mb, want_entropy)
        res = loss_fn(out, mb)
        loss, stats = res if isinstance(res, tuple) else (res, {})
        total = loss * scale
        aux = self.model.moe_aux_loss() if hasattr(self.model, "moe_aux_loss") else None
        if aux is not None:  # the MoE load-balancing loss, weighted like the tokens it routed
            total = total + aux * aux_scale
        total.backward()
        return loss.detach(), stats


class FlatRunner(Runner):
    """The packed batch through the whole model: one forward (and backward) per micro-batch."""

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        ids, cu = mb.input_ids.to(self.device), mb.cu_seqlens.to(self.device)
        with self.autocast():
            if self.head == "value":
                values = self.model(ids, cu_seqlens=cu)
                return {"values": values.float().reshape(-1)}
            lp, ent = self.model(ids, cu_seqlens=cu, labels=next_token_labels(ids), want_entropy=want_entropy,
                                 logprob_chunk_size=self.chunk)
        out = {"logprobs": shift_to_tokens(lp, cu)}
        if want_entropy:
            out["entropy"] = shift_to_tokens(ent, cu)
        return out
