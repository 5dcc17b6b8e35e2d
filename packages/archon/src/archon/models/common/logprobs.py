"""Per-token log-probabilities and entropy straight from hidden states, chunked over tokens.

One autograd Function per chunk of C tokens runs the LM-head matmul and the softmax statistics together and
saves what backward needs: the chunk's hidden states, the head weight and two fp32 numbers per token
(logsumexp, entropy). Backward recomputes the chunk's logits (one matmul) and turns them into the logits
gradient in one pass, so [tokens, vocab] fp32 logits never exist. With `keep_last_logits` the last chunk
keeps its logits ([C, V] in the compute dtype) instead: when backward follows the forward directly, that
chunk's backward runs first, before any other chunk's logits would be rebuilt, so keeping them adds nothing
to peak memory (a micro-batch of one chunk then recomputes nothing). Callers that hold several forwards
before their backwards (pipeline schedules, DTA's kept graphs) leave it off.

The two elementwise passes (softmax statistics; logits gradient) are plain functions. `compile_backend`
compiles them with torch.compile (the engine passes its own backend when it compiles the model): each
becomes one or two fused passes over the bf16 logits instead of several passes over fp32 copies. Measured on
one H200 (`benchmarks/lm_head.py`: Qwen3-1.7B head, 4096 tokens, fwd+bwd with entropy): 33.5 ms with eager
kernels and the chunk rebuilt, 15.4 ms compiled with the last chunk kept.

Under tensor parallelism the weight is a vocab shard: the same Function all-reduces per-token statistics (one
MAX, one SUM of [3, C]; the shard pieces of `archon_parallel.vocab_parallel`) instead of gathering logits, and
backward needs no collective; the logits gradient is `archon_parallel.vocab_parallel.logits_grad` in both
cases.

T: packed tokens, C: a chunk of them, D: model dim, V: vocab (local shard under TP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from archon_parallel.vocab_parallel import finish_stats, logits_grad, shard_labels, shard_max, shard_sums
from torch.autograd.function import once_differentiable

__all__ = ["head_logprobs", "next_token_labels", "shift_to_tokens"]


def _softmax_stats(logits_CV: torch.Tensor, labels_C: torch.Tensor, want_entropy: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (logprob of the label, logsumexp, entropy or zeros), each [C]."""
    x_CV = logits_CV.float()
    lse_C = torch.logsumexp(x_CV, dim=-1)
    lp_C = x_CV.gather(1, labels_C[:, None]).squeeze(1) - lse_C
    if not want_entropy:
        return lp_C, lse_C, torch.zeros_like(lse_C)
    p_CV = torch.exp(x_CV - lse_C[:, None])
    return lp_C, lse_C, lse_C - p_CV.mul_(x_CV).sum(-1)  # H = lse - E_p[x]


class _Kernels(NamedTuple):
    stats: Callable
    shard_max: Callable
    shard_sums: Callable
    grad: Callable


@functools.cache
def _kernels(compile_backend: str | None) -> _Kernels:
    """The elementwise passes, compiled with `compile_backend` or eager (None)."""
    fns = (_softmax_stats, shard_max, shard_sums, logits_grad)
    if compile_backend is None:
        return _Kernels(*fns)
    return _Kernels(*(torch.compile(f, backend=compile_backend, dynamic=None) for f in fns))


def _vocab_parallel_stats(k: _Kernels, logits_CV: torch.Tensor, labels_C: torch.Tensor, want_entropy: bool,
                          group, vocab_start: int) -> tuple[torch.Tensor, ...]:
    """(logprob, logsumexp, entropy or zeros, local label index, label-on-this-shard) from a vocab shard: one
    MAX and one SUM all-reduce of per-token statistics, never the logits."""
    local_C, in_shard_C = shard_labels(labels_C, vocab_start, logits_CV.shape[1])
    max_C = k.shard_max(logits_CV)
    dist.all_reduce(max_C, op=dist.ReduceOp.MAX, group=group)
    sums_3C = k.shard_sums(logits_CV, max_C, local_C, in_shard_C, want_entropy)
    dist.all_reduce(sums_3C, op=dist.ReduceOp.SUM, group=group)
    return *finish_stats(max_C, sums_3C, want_entropy), local_C, in_shard_C


class _HeadChunk(torch.autograd.Function):
    """(logprobs [C], entropy [C]) of one chunk from hidden states [C, D] and the head weight [V, D]; under
    tensor parallelism ``tp = (group, vocab_start)`` and the weight is this rank's vocab shard [Vl, D]: the
    outputs are then the same on every tp rank, and the hidden-state gradient is this shard's partial sum."""

    @staticmethod
    def forward(ctx, h_CD, w_VD, labels_C, want_entropy: bool, keep_logits: bool, compile_backend, tp):
        k = _kernels(compile_backend)
        logits_CV = h_CD @ w_VD.t()
        if tp is None:
            lp_C, lse_C, ent_C = k.stats(logits_CV, labels_C, want_entropy)
            in_shard_C = None
        else:
            lp_C, lse_C, ent_C, labels_C, in_shard_C = _vocab_parallel_stats(k, logits_CV, labels_C, want_entropy,
                                                                             *tp)
        ctx.save_for_backward(h_CD, w_VD, labels_C, in_shard_C, lse_C, ent_C, logits_CV if keep_logits else None)
        ctx.want_entropy, ctx.compile_backend = want_entropy, compile_backend
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) gets None: its term is skipped
        return lp_C, ent_C

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp_C, g_ent_C):
        h_CD, w_VD, labels_C, in_shard_C, lse_C, ent_C, logits_CV = ctx.saved_tensors
        if g_lp_C is None and g_ent_C is None:
            return None, None, None, None, None, None, None
        if logits_CV is None:
            logits_CV = h_CD @ w_VD.t()
        g_lp_C = torch.zeros_like(lse_C) if g_lp_C is None else g_lp_C.float()
        g_ent_C = g_ent_C.float() if g_ent_C is not None and ctx.want_entropy else None
        onehot_C = g_lp_C if in_shard_C is None else torch.where(in_shard_C, g_lp_C, 0.0)
        g_CV = _kernels(ctx.compile_backend).grad(logits_CV, labels_C, lse_C, ent_C, g_lp_C, g_ent_C, onehot_C)
        g_h = g_CV @ w_VD if ctx.needs_input_grad[0] else None
        g_w = g_CV.t() @ h_CD if ctx.needs_input_grad[1] else None
        return g_h, g_w, None, None, None, None, None


def head_logprobs(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, *, chunk_size: int = 4096,
                  want_entropy: bool = False, keep_last_logits: bool = False, compile_backend: str | None = None,
                  tp_group: dist.ProcessGroup | None = None, vocab_start: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels_T[t] | h_TD[t]) and the entropy of that distribution (zeros unless `want_entropy`), both
    [T] fp32 and differentiable.

    Under autocast the matmuls run in the autocast dtype (the weight is cast once, not once per chunk).
    `keep_last_logits`: keep the last chunk's logits for backward (see the module doc). `compile_backend`:
    torch.compile the softmax kernels with this backend (None: eager).
    Tensor parallel (vocab-parallel head): `tp_group` given, `w_VD` is this rank's vocab shard starting at vocab
    id `vocab_start`, `h_TD` the full (replicated) hidden states and `labels_T` global ids. The outputs are the
    same on every rank and the vocab is never gathered; h_TD's gradient is this shard's partial sum (the
    caller sums it over the group, e.g. a DTensor with a Partial gradient placement).
    """
    if chunk_size <= 0:
        raise ValueError(f"logprob chunk size must be positive, got {chunk_size}")
    tp = None if tp_group is None else (tp_group, vocab_start)
    device_type = h_TD.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h_TD, w_VD = h_TD.to(dtype), w_VD.to(dtype)
    T = h_TD.shape[0]
    lps, ents = [], []
    with torch.autocast(device_type, enabled=False):
        for s in range(0, T, chunk_size):
            lp, ent = _HeadChunk.apply(h_TD[s:s + chunk_size], w_VD, labels_T[s:s + chunk_size], want_entropy,
                                       keep_last_logits and s + chunk_size >= T, compile_backend, tp)
            lps.append(lp)
            ents.append(ent)
    if len(lps) == 1:
        return lps[0], ents[0]
    return torch.cat(lps), torch.cat(ents)


def shift_to_tokens(pred_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Move predictions made at token t (for token t+1) onto token t+1; zero at every sequence start."""
    out_T = torch.roll(pred_T, 1, 0)
    starts = cu_seqlens[:-1].long()
    return out_T.index_fill(0, starts, 0.0)


def next_token_labels(input_ids_T: torch.Tensor) -> torch.Tensor:
    return torch.roll(input_ids_T, -1, 0)
