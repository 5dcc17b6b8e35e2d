"""How one micro-batch runs through the model: the strategy objects behind `forward_batch` / `train_batch`.

The engine calls `runner.forward_all(mbs, want_entropy)` and `runner.forward_backward_all(mbs, loss_fn, scales,
aux_scales)` with every micro-batch of a step and never asks which runner it holds. By default these run
`forward` / `forward_backward` one micro-batch at a time; `FlatRunner` runs the packed batch as is, tree modes
(prefix sharing) override the per-micro-batch methods, and `PipelineRunner` (pipeline_runner.py) overrides the
batch methods to run a pipeline schedule over all micro-batches together.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from archon.engine.batch import PackedBatch
from archon.engine.logprobs import next_token_labels, shift_to_tokens


class Runner:
    """Interface. `forward` returns token-aligned outputs; `forward_backward` also back-propagates
    `loss_fn(outputs, mb) * scale` (+ the MoE aux loss weighted by `aux_scale`) and returns the loss value."""

    def __init__(self, model: torch.nn.Module, *, head: str, device: torch.device,
                 autocast: Callable[[], AbstractContextManager], logprob_chunk_size: int = 4096,
                 pad_multiple: int = 1) -> None:
        self.model = model
        self.pad_multiple = pad_multiple
        self.head = head
        self.device = device
        self.autocast = autocast
        self.chunk = logprob_chunk_size

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_all(self, mbs: list[PackedBatch], want_entropy: bool) -> list[dict[str, torch.Tensor]]:
        """`forward` of every micro-batch of a step (a pipeline runs them together)."""
        return [self.forward(mb, want_entropy) for mb in mbs]

    def forward_backward_all(self, mbs: list[PackedBatch], loss_fn, scales: list[float], aux_scales: list[float]
                             ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """`forward_backward` of every micro-batch of a step, in order (a pipeline runs them together)."""
        return [self.forward_backward(mb, loss_fn, s, aux_scale=a) for mb, s, a in zip(mbs, scales, aux_scales)]

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
        ids, cu = pad_packed(mb.input_ids.to(self.device), mb.cu_seqlens.to(self.device), self.pad_multiple)
        T = mb.num_tokens
        out = self._forward_padded(ids, cu, want_entropy)
        return {k: v[:T] for k, v in out.items()}

    def _forward_padded(self, ids: torch.Tensor, cu: torch.Tensor, want_entropy: bool) -> dict[str, torch.Tensor]:
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


def pad_packed(ids_T: torch.Tensor, cu: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one padding document so the token count is a multiple of `multiple` (sequence parallel needs
    equal shards). The padding is its own document, so it attends to nothing real; callers slice it off."""
    T = ids_T.shape[0]
    pad = (-T) % multiple
    if pad == 0:
        return ids_T, cu
    ids_T = torch.cat([ids_T, ids_T.new_zeros(pad)])
    cu = torch.cat([cu, cu.new_tensor([T + pad])])
    return ids_T, cu
