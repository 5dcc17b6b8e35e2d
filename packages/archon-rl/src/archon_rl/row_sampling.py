"""Next-token sampling with per-row settings, as device tensors: the sampling step of a captured decode graph.

Each row carries its own temperature (0 = greedy), top-k, top-p, seed and step index, so one batch mixes
requests with different settings and nothing is read on the host. Sampled rows use `archon_rl.sampler`'s
Gumbel-max with noise hashed from (seed, step, token id): a row's token is the one ``sample_tokens`` picks for
the same seed and step, whatever else is in the batch.

B: rows, V: vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from archon_rl.sampler import _gumbel

__all__ = ["gumbel_logits", "sample_rows"]


def gumbel_logits(scaled_BV: torch.Tensor, seeds_B: torch.Tensor, step_B: torch.Tensor) -> torch.Tensor:
    """``scaled_BV`` plus each row's Gumbel noise: elementwise, so compiled it is one parallel pass (fused into
    the argmax's reduction instead, a row's 150K hashes would run on a single thread block)."""
    return scaled_BV + _gumbel(seeds_B, step_B, scaled_BV.shape[-1])


def sample_rows(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
                seeds_B: torch.Tensor, step_B: torch.Tensor, truncate: bool,
                noisy: Callable = gumbel_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their logprobs [B] under the untempered, untruncated distribution.

    ``truncate=False`` skips top-k / top-p (the caller knows no row uses them: a full-vocab sort is the
    costliest part of sampling). ``noisy``: `gumbel_logits` or a compiled version of it."""
    logits_BV = logits_BV.float()
    V = logits_BV.shape[-1]
    greedy_B = temperature_B <= 0
    scaled_BV = logits_BV / torch.where(greedy_B, 1.0, temperature_B)[:, None]
    if truncate:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        k_B = torch.where((top_k_B > 0) & (top_k_B < V), top_k_B, V)
        kth_B1 = sorted_BV.gather(-1, (k_B - 1)[:, None])
        sorted_BV = sorted_BV.masked_fill(sorted_BV < kth_B1, float("-inf"))
        probs_BV = sorted_BV.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays; top_p 1 = off).
        drop_BV = (probs_BV.cumsum(-1) - probs_BV >= top_p_B[:, None]) & (top_p_B < 1)[:, None]
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        noise_BV = noisy(torch.zeros_like(scaled_BV), seeds_B, step_B)
        pick_B1 = (sorted_BV + noise_BV.gather(-1, order_BV)).argmax(-1, keepdim=True)
        sampled_B = order_BV.gather(-1, pick_B1).squeeze(-1)
    else:
        sampled_B = noisy(scaled_BV, seeds_B, step_B).argmax(-1)
    tok_B = torch.where(greedy_B, logits_BV.argmax(-1), sampled_B)
    return tok_B, logits_BV.gather(-1, tok_B[:, None]).squeeze(-1) - logits_BV.logsumexp(-1)
