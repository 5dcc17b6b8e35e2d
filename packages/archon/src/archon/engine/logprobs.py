"""Per-token log-probabilities and entropy straight from hidden states, chunked over tokens.

The LM head is applied one chunk of tokens at a time and each chunk is recomputed in backward
(activation checkpointing), so [tokens, vocab] fp32 logits never exist for the whole batch.
T: packed tokens, D: model dim, V: vocab (local shard under TP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_dense(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, want_entropy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    # cross_entropy / log_softmax are single fused kernels forward and backward; a hand-written
    # logsumexp - gather takes several passes over the [T, V] fp32 logits each way.
    logits_TV = (h_TD @ w_VD.t()).float()
    if not want_entropy:
        lp_T = -F.cross_entropy(logits_TV, labels_T, reduction="none")
        return lp_T, torch.zeros_like(lp_T)
    logp_TV = logits_TV.log_softmax(-1)
    lp_T = logp_TV.gather(-1, labels_T[:, None]).squeeze(-1)
    ent_T = -(logp_TV.exp() * logp_TV).sum(-1)
    return lp_T, ent_T


def head_logprobs(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, *, chunk_size: int = 4096,
                  want_entropy: bool = False, vocab_parallel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels_T[t] | h_TD[t]) and the entropy of that distribution, both [T] fp32.

    `vocab_parallel`, if given, is a callable (logits_local_TV, labels_T) -> (logprobs, entropy) for a
    vocab-sharded head (tensor parallel); `w_VD` is then the local shard.
    """
    if chunk_size <= 0:
        raise ValueError(f"logprob chunk size must be positive, got {chunk_size}")
    fn = _chunk_dense
    if vocab_parallel is not None:
        def fn(h, w, y, want):  # noqa: E306
            return vocab_parallel((h @ w.t()).float(), y)
    lps, ents = [], []
    for s in range(0, h_TD.shape[0], chunk_size):
        args = (h_TD[s:s + chunk_size], w_VD, labels_T[s:s + chunk_size], want_entropy)
        if torch.is_grad_enabled() and (h_TD.requires_grad or w_VD.requires_grad):
            lp, ent = checkpoint(fn, *args, use_reentrant=False)
        else:
            lp, ent = fn(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


def shift_to_tokens(pred_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Move predictions made at token t (for token t+1) onto token t+1; zero at every sequence start."""
    out_T = torch.roll(pred_T, 1, 0)
    starts = cu_seqlens[:-1].long()
    return out_T.index_fill(0, starts, 0.0)


def next_token_labels(input_ids_T: torch.Tensor) -> torch.Tensor:
    return torch.roll(input_ids_T, -1, 0)
