"""Per-token log-probabilities and entropy of logits, dense (chunked) or vocab-parallel (no gather).

Legend: T packed tokens, V vocab (Vl: the local vocab shard), C a chunk of tokens.

Both paths run one custom autograd Function that walks the tokens in chunks and upcasts each chunk
to fp32, so full-vocab fp32 logits for all tokens never exist at once; backward recomputes the
softmax per chunk. The vocab-parallel path reduces per-token statistics over the tp group
(one MAX, one SUM all-reduce of [3, T]) and never gathers the vocab; backward needs no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

__all__ = ["logprobs_entropy", "vocab_parallel_logprobs_entropy"]

DEFAULT_CHUNK = 1024


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, labels_T, group, vocab_start: int, chunk: int):
        T, Vl = logits_TV.shape
        local_T = labels_T - vocab_start
        in_shard_T = (local_T >= 0) & (local_T < Vl)
        local_T = local_T.clamp(0, Vl - 1)
        max_T = torch.empty(T, dtype=torch.float32, device=logits_TV.device)
        for s in range(0, T, chunk):
            max_T[s:s + chunk] = logits_TV[s:s + chunk].float().amax(dim=-1)
        _all_reduce(max_T, dist.ReduceOp.MAX, group)
        # stats: sum exp(x - max), label logit (0 off-shard), sum exp(x - max) * x
        stats_3T = torch.zeros(3, T, dtype=torch.float32, device=logits_TV.device)
        for s in range(0, T, chunk):
            x_CV = logits_TV[s:s + chunk].float()
            e_CV = torch.exp(x_CV - max_T[s:s + chunk, None])
            stats_3T[0, s:s + chunk] = e_CV.sum(-1)
            picked_C = x_CV.gather(1, local_T[s:s + chunk, None]).squeeze(1)
            stats_3T[1, s:s + chunk] = torch.where(in_shard_T[s:s + chunk], picked_C, 0.0)
            stats_3T[2, s:s + chunk] = (e_CV * x_CV).sum(-1)
        _all_reduce(stats_3T, dist.ReduceOp.SUM, group)
        lse_T = max_T + stats_3T[0].log()
        mean_x_T = stats_3T[2] / stats_3T[0]  # E_p[x]
        logprobs_T = stats_3T[1] - lse_T
        entropy_T = lse_T - mean_x_T
        ctx.save_for_backward(logits_TV, local_T, in_shard_T, lse_T, mean_x_T)
        ctx.chunk = chunk
        return logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprobs_T, grad_entropy_T):
        logits_TV, local_T, in_shard_T, lse_T, mean_x_T = ctx.saved_tensors
        chunk = ctx.chunk
        if grad_logprobs_T is None:
            grad_logprobs_T = torch.zeros_like(lse_T)
        if grad_entropy_T is None:
            grad_entropy_T = torch.zeros_like(lse_T)
        grad_TV = torch.empty_like(logits_TV)
        for s in range(0, logits_TV.shape[0], chunk):
            x_CV = logits_TV[s:s + chunk].float()
            p_CV = torch.exp(x_CV - lse_T[s:s + chunk, None])
            glp_C1 = grad_logprobs_T[s:s + chunk, None].float()
            gent_C1 = grad_entropy_T[s:s + chunk, None].float()
            # d logprob/dx = onehot - p;  d entropy/dx = -p * (x - E_p[x])
            g_CV = -p_CV * (glp_C1 + gent_C1 * (x_CV - mean_x_T[s:s + chunk, None]))
            onehot_C = torch.where(in_shard_T[s:s + chunk], glp_C1.squeeze(1), 0.0)
            g_CV.scatter_add_(1, local_T[s:s + chunk, None], onehot_C[:, None])
            grad_TV[s:s + chunk] = g_CV.to(grad_TV.dtype)
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
