"""How one micro-batch runs through the model: the strategy objects behind `forward_batch` / `train_batch`.

The engine calls `runner.forward_all(mbs, want_entropy)` and `runner.forward_backward_all(mbs, loss_fn, scales,
aux_scales)` with every micro-batch of a step and never asks which runner it holds. By default these run
`forward` / `forward_backward` one micro-batch at a time; `FlatRunner` runs the packed batch as is, tree modes
(prefix sharing) override the per-micro-batch methods, and `PipelineRunner` (pipeline_runner.py) overrides the
batch methods to run a pipeline schedule over all micro-batches together. Which sequences form a micro-batch is
planned before the runner sees them, by `archon.engine.micro_batches.MicroBatchBudget`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from archon.engine.batch import PackedBatch
from archon.engine.logprobs import next_token_labels, shift_to_tokens
from archon.models.common.head import LogprobRequest
from archon.models.common.packing import pack_inputs


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

    def pop_stats(self) -> dict[str, float]:
        """Counters accumulated by `forward_backward` since the last call (same on every DP rank)."""
        return {}

    def forward_backward(self, mb: PackedBatch, loss_fn, scale: float, aux_scale: float, want_entropy: bool = True
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.forward(mb, want_entropy)
        res = loss_fn(out, mb.to(self.device))  # a non-blocking copy: the loss's .to(device) calls are no-ops
        loss, stats = res if isinstance(res, tuple) else (res, {})
        total = loss * scale
        aux = self.model.moe_aux_loss() if hasattr(self.model, "moe_aux_loss") else None
        if aux is not None:  # the MoE load-balancing loss, weighted like the tokens it routed
            total = total + aux * aux_scale
        total.backward()
        return loss.detach(), stats


class FlatRunner(Runner):
    """The packed batch through the whole model: one forward (and backward) per micro-batch.

    `pad_to_tokens` (`actor.archon.pad_to_maximum`: the micro-batch token budget) pads every micro-batch to
    that many tokens, so compiled blocks see one static shape; without it a micro-batch is padded only to a
    multiple of `pad_multiple` (tp, for sequence parallel).
    """

    def __init__(self, model: torch.nn.Module, *, pad_to_tokens: int | None = None, cuda_graphs: bool = False,
                 **kw) -> None:
        super().__init__(model, **kw)
        if pad_to_tokens is not None and pad_to_tokens < 1:
            raise ValueError(f"pad_to_tokens must be positive, got {pad_to_tokens}")
        self.pad_to_tokens = pad_to_tokens
        self.cuda_graphs = cuda_graphs  # compile_mode=reduce-overhead: each micro-batch is a new graph step

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        from archon_attn import to_device

        T = mb.num_tokens
        L = padded_length(T, self.pad_multiple, self.pad_to_tokens)
        ids_L, cu = pad_to_length(mb.input_ids, mb.cu_seqlens, L)  # on the host: no device sync
        out = self._forward_padded(to_device(ids_L, self.device), cu, want_entropy)
        return {k: v[:T] for k, v in out.items()}

    def _forward_padded(self, ids: torch.Tensor, cu: torch.Tensor, want_entropy: bool) -> dict[str, torch.Tensor]:
        if self.cuda_graphs:  # earlier replays' outputs are consumed: their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        packed = pack_inputs(ids, None, cu)  # host cu_seqlens: the meta is built there and copied
        cu = packed.cu_seqlens
        dynamo = sys.modules.get("torch._dynamo")  # torch.compile imports it; absent, nothing is compiled
        if dynamo is not None:  # the document count is data, not a graph constant: one graph serves every count
            dynamo.maybe_mark_dynamic(packed.meta.cu_seqlens, 0)
        if self.pad_to_tokens is not None:
            packed.meta.seqlen_bound = ids.shape[0]  # static, unlike the longest document
        with self.autocast():
            if self.head == "value":
                values = self.model(ids, packed=packed)
                return {"values": values.float().reshape(-1)}
            lp, ent = self.model(ids, packed=packed, logprobs=LogprobRequest(
                next_token_labels(ids), want_entropy=want_entropy, chunk_size=self.chunk, keep_last_logits=True))
        out = {"logprobs": shift_to_tokens(lp, cu)}
        if want_entropy:
            out["entropy"] = shift_to_tokens(ent, cu)
        return out


OVERSIZE_BUCKET = 1024  # a micro-batch over the budget (one long sequence) pads to a multiple of this


def padded_length(T: int, multiple: int, budget: int | None = None) -> int:
    """Tokens a micro-batch of T tokens is padded to: the next multiple of `multiple`; with a `budget`
    (pad_to_maximum), the budget rounded up to `multiple`, or for a longer micro-batch the next multiple of
    lcm(OVERSIZE_BUCKET, multiple), so over-budget micro-batches add few distinct shapes."""
    if budget is None:
        return -(-T // multiple) * multiple
    full = -(-budget // multiple) * multiple
    if T <= full:
        return full
    bucket = math.lcm(OVERSIZE_BUCKET, multiple)
    return -(-T // bucket) * bucket


def pad_to_length(ids_T: torch.Tensor, cu: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one padding document of L - T tokens (none when T == L). The padding is its own document, so
    no real token attends to it and it attends to nothing real; callers slice its outputs off."""
    T = ids_T.shape[0]
    if L < T:
        raise ValueError(f"cannot pad {T} tokens to {L}")
    if L == T:
        return ids_T, cu
    ids_T = torch.cat([ids_T, ids_T.new_zeros(L - T)])
    cu = torch.cat([cu, cu.new_tensor([L])])
    return ids_T, cu


def pad_packed(ids_T: torch.Tensor, cu: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (one padding document) to the next multiple of `multiple` (sequence parallel needs equal shards)."""
    return pad_to_length(ids_T, cu, padded_length(ids_T.shape[0], multiple))
