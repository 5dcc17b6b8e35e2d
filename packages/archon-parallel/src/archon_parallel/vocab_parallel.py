"""Per-token log-probabilities and entropy of logits, dense (chunked) or vocab-parallel (no gather).

Legend: T packed tokens, V vocab (Vl: the local vocab shard), C a chunk of tokens.

Both paths run one custom autograd Function that walks the tokens in chunks and upcasts each chunk
to fp32, so full-vocab fp32 logits for all tokens never exist at once; backward recomputes the
softmax per chunk. The vocab-parallel path reduces per-token statistics over the tp group (one MAX,
one SUM all-reduce of [3, T]) and never gathers the vocab; backward needs no collective. The per-chunk
pieces (`shard_labels`, `shard_max`, `shard_sums`, `finish_stats`, `logits_grad`) are public: the engine's
fused LM head (`archon.models.common.logprobs`) computes the same statistics with them, compiled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

__all__ = ["finish_stats", "logits_grad", "logprobs_entropy", "shard_labels", "shard_max", "shard_sums",
           "vocab_parallel_logprobs_entropy"]

DEFAULT_CHUNK = 1024


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)


# -- the per-token statistics of a vocab shard, shared with the engine's fused LM head
# (`archon.models.common.logprobs`, which compiles them). C: a chunk of tokens, Vl: the local vocab shard.

def shard_labels(labels_T: torch.Tensor, vocab_start: int, Vl: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index inside this shard, clamped; whether the label is on this shard), both [T]."""
    local_T = labels_T - vocab_start
    in_shard_T = (local_T >= 0) & (local_T < Vl)
    return local_T.clamp(0, Vl - 1), in_shard_T


def shard_max(logits_CV: torch.Tensor) -> torch.Tensor:
    """fp32 row max of a shard's logits [C] (reduced with MAX over the tp group)."""
    return logits_CV.float().amax(dim=-1)


def shard_sums(logits_CV: torch.Tensor, max_C: torch.Tensor, local_C: torch.Tensor, in_shard_C: torch.Tensor,
               want_entropy: bool = True) -> torch.Tensor:
    """fp32 [3, C] partial sums of a shard (reduced with SUM over the tp group): sum exp(x - max), the label's
    logit (0 where the label is on another shard), sum exp(x - max) * x (zeros unless `want_entropy`)."""
    x_CV = logits_CV.float()
    e_CV = torch.exp(x_CV - max_C[:, None])
    picked_C = torch.where(in_shard_C, x_CV.gather(1, local_C[:, None]).squeeze(1), 0.0)
    ex_C = e_CV.mul(x_CV).sum(-1) if want_entropy else torch.zeros_like(max_C)
    return torch.stack([e_CV.sum(-1), picked_C, ex_C])


def finish_stats(max_T: torch.Tensor, sums_3T: torch.Tensor, want_entropy: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob, logsumexp, entropy or zeros) from the reduced max and sums."""
    lse_T = max_T + sums_3T[0].log()
    ent_T = lse_T - sums_3T[2] / sums_3T[0] if want_entropy else torch.zeros_like(lse_T)  # H = lse - E_p[x]
    return sums_3T[1] - lse_T, lse_T, ent_T


def logits_grad(logits_CV: torch.Tensor, labels_C: torch.Tensor, lse_C: torch.Tensor, ent_C: torch.Tensor,
                g_lp_C: torch.Tensor, g_ent_C: torch.Tensor | None, onehot_C: torch.Tensor) -> torch.Tensor:
    """d loss / d logits in the logits' dtype: d logprob/dx = onehot - p, d entropy/dx = -p (x - E_p[x]).
    `onehot_C` is what lands on each label's logit: g_lp, or 0 where the label is on another shard."""
    # In place where possible: eager mode then holds two fp32 [C, V] buffers, not five (compiled, it fuses).
    x_CV = logits_CV.to(torch.float32, copy=True)  # a copy even from fp32: the saved logits stay intact
    g_CV = torch.exp(x_CV - lse_C[:, None])  # p, becoming the gradient
    if g_ent_C is None:
        g_CV.mul_(-g_lp_C[:, None])
    else:
        coef_CV = x_CV.sub_((lse_C - ent_C)[:, None]).mul_(g_ent_C[:, None]).add_(g_lp_C[:, None])
        g_CV.mul_(coef_CV).neg_()
    g_CV.scatter_add_(1, labels_C[:, None], onehot_C[:, None])
    return g_CV.to(logits_CV.dtype)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, labels_T, group, vocab_start: int, chunk: int):
        T, Vl = logits_TV.shape
        local_T, in_shard_T = shard_labels(labels_T, vocab_start, Vl)
        spans = [slice(s, s + chunk) for s in range(0, T, chunk)]
        max_T = logits_TV.new_empty(T, dtype=torch.float32)
        for sl in spans:
            max_T[sl] = shard_max(logits_TV[sl])
        _all_reduce(max_T, dist.ReduceOp.MAX, group)
        sums_3T = logits_TV.new_empty(3, T, dtype=torch.float32)
        for sl in spans:
            sums_3T[:, sl] = shard_sums(logits_TV[sl], max_T[sl], local_T[sl], in_shard_T[sl])
        _all_reduce(sums_3T, dist.ReduceOp.SUM, group)
        logprobs_T, lse_T, entropy_T = finish_stats(max_T, sums_3T)
        ctx.save_for_backward(logits_TV, local_T, in_shard_T, lse_T, entropy_T)
        ctx.spans = spans
        return logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprobs_T, grad_entropy_T):
        logits_TV, local_T, in_shard_T, lse_T, entropy_T = ctx.saved_tensors
        g_lp_T, g_ent_T = grad_logprobs_T.float(), grad_entropy_T.float()
        onehot_T = torch.where(in_shard_T, g_lp_T, 0.0)
        grad_TV = torch.empty_like(logits_TV)
        for sl in ctx.spans:
            grad_TV[sl] = logits_grad(logits_TV[sl], local_T[sl], lse_T[sl], entropy_T[sl], g_lp_T[sl], g_ent_T[sl],
                                      onehot_T[sl])
        return grad_TV, None, None, None, None


def _check(logits_TV: torch.Tensor, labels_T: torch.Tensor, chunk: int) -> None:
    if logits_TV.dim() != 2:
        raise ValueError(f"logits must be [T, V] (packed tokens), got shape {tuple(logits_TV.shape)}")
    if labels_T.shape != logits_TV.shape[:1]:
        raise ValueError(f"labels must be [T] = [{logits_TV.shape[0]}], got shape {tuple(labels_T.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")


def vocab_parallel_logprobs_entropy(
    logits_local_TV: torch.Tensor | DTensor,
    labels_T: torch.Tensor,
    tp_group: dist.ProcessGroup | DeviceMesh | None = None,
    vocab_start: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels_T`` and entropy per token from vocab-sharded logits, without a vocab gather.

    Pass either the local shard ``[T, V/tp]`` with ``tp_group`` and the shard's first vocab id
    ``vocab_start``, or a DTensor sharded on its last dim over a 1-D mesh (group and offset are read
    from it). ``labels_T`` holds global vocab ids, the same on every tp rank. Both outputs are fp32,
    identical on every tp rank, and differentiable.
    """
    if isinstance(logits_local_TV, DTensor):
        mesh = logits_local_TV.device_mesh
        if mesh.ndim != 1 or logits_local_TV.placements[0] not in (Shard(-1), Shard(logits_local_TV.dim() - 1)):
            raise ValueError(f"DTensor logits must be sharded on the vocab (last) dim over a 1-D mesh, got "
                             f"{logits_local_TV.placements} on a {mesh.ndim}-D mesh")
        vocab = logits_local_TV.shape[-1]
        per_rank = -(-vocab // mesh.size())  # DTensor Shard follows torch.chunk: ceil-sized shards
        vocab_start = mesh.get_local_rank() * per_rank
        tp_group = mesh.get_group()
        logits_local_TV = logits_local_TV.to_local()
    elif isinstance(tp_group, DeviceMesh):
        tp_group = tp_group.get_group()
    if vocab_start is None:
        raise ValueError("vocab_start is required when logits are a plain local shard")
    _check(logits_local_TV, labels_T, chunk_size)
    return _LogprobEntropy.apply(logits_local_TV, labels_T, tp_group, vocab_start, chunk_size)


def logprobs_entropy(logits_TV: torch.Tensor | DTensor, labels_T: torch.Tensor, *,
                     chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logprobs_T, entropy_T)`` in fp32, computed in token chunks of ``chunk_size``.

    A DTensor sharded on the vocab dim (a tensor-parallel head) goes to the vocab-parallel path; a
    replicated DTensor is used through its local copy. Labels outside ``[0, V)`` (e.g. -100 on prompt
    tokens) are allowed and give ``-logsumexp``: mask those tokens in the loss.
    """
    if isinstance(logits_TV, DTensor):
        if any(p.is_shard() for p in logits_TV.placements):
            return vocab_parallel_logprobs_entropy(logits_TV, labels_T, chunk_size=chunk_size)
        logits_TV = logits_TV.to_local()
    _check(logits_TV, labels_T, chunk_size)
    return _LogprobEntropy.apply(logits_TV, labels_T, None, 0, chunk_size)
