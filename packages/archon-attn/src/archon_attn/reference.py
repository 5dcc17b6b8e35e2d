"""Naive per-document masked-softmax attention: the independent reference for tests (slow, exact).

Legend: T packed tokens, H query heads, G key/value heads, D head dim, L one document's length.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_attention"]


def reference_attention(q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, cu_seqlens: torch.Tensor,
                        *, scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention computed document by document in plain math."""
    H, G, D = q_THD.shape[1], k_TGD.shape[1], q_THD.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        L = end - start
        if L == 0:
            continue
        q_HLD = q_THD[start:end].transpose(0, 1)
        k_HLD = k_TGD[start:end].repeat_interleave(H // G, dim=1).transpose(0, 1)
        v_HLD = v_TGD[start:end].repeat_interleave(H // G, dim=1).transpose(0, 1)
        scores_HLL = q_HLD @ k_HLD.transpose(1, 2) * scale
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=q_THD.device).tril()
        scores_HLL = scores_HLL.masked_fill(~causal_LL, float("-inf"))
        outs.append((scores_HLL.softmax(dim=-1) @ v_HLD).transpose(0, 1))
    if not outs:
        return q_THD.new_zeros(q_THD.shape)
    return torch.cat(outs, dim=0)
