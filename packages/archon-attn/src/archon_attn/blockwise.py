"""Attention of one query block against one key/value block under an arbitrary boolean mask,
returning the log-sum-exp so that partial results merge exactly (online softmax), plus the matching
backward. The building block of ring attention; plain torch math (any device, fp32 accumulation).

Legend: Q query tokens, K key tokens, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import torch

from archon_attn.sdpa import repeat_kv

__all__ = ["block_attention_forward", "block_attention_backward", "merge_partial_attention"]


def _scores(q_QHD, k_KGD, mask_QK, scale):
    H = q_QHD.shape[1]
    q_HQD = q_QHD.transpose(0, 1).float()
    k_HKD = repeat_kv(k_KGD, H).transpose(0, 1).float()
    s_HQK = (q_HQD @ k_HKD.transpose(1, 2)) * scale
    return s_HQK.masked_fill(~mask_QK, float("-inf")), q_HQD, k_HKD


def block_attention_forward(q_QHD: torch.Tensor, k_KGD: torch.Tensor, v_KGD: torch.Tensor, mask_QK: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to `mask_QK` (True = attend). Returns fp32 (o_QHD, lse_HQ).

    A query row with no allowed key gets o = 0 and lse = -inf (it then carries zero weight in a merge).
    """
    s_HQK, _, _ = _scores(q_QHD, k_KGD, mask_QK, scale)
    lse_HQ = torch.logsumexp(s_HQK, dim=-1)
    p_HQK = torch.exp(s_HQK - torch.where(torch.isinf(lse_HQ), 0.0, lse_HQ)[..., None])
    o_HQD = p_HQK @ repeat_kv(v_KGD, q_QHD.shape[1]).transpose(0, 1).float()
    return o_HQD.transpose(0, 1), lse_HQ


def merge_partial_attention(o_QHD: torch.Tensor, lse_HQ: torch.Tensor, part_o_QHD: torch.Tensor,
                            part_lse_HQ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax partials over disjoint key sets into the softmax over their union."""
    new_lse_HQ = torch.logaddexp(lse_HQ, part_lse_HQ)
    # exp(-inf - -inf) is NaN: a side with no keys yet must weigh 0.
    w_QH1 = torch.exp(lse_HQ - new_lse_HQ).nan_to_num(0.0).transpose(0, 1)[..., None]
    part_w_QH1 = torch.exp(part_lse_HQ - new_lse_HQ).nan_to_num(0.0).transpose(0, 1)[..., None]
    return o_QHD * w_QH1 + part_o_QHD * part_w_QH1, new_lse_HQ


def block_attention_backward(do_QHD: torch.Tensor, q_QHD: torch.Tensor, k_KGD: torch.Tensor, v_KGD: torch.Tensor,
                             mask_QK: torch.Tensor, scale: float, lse_HQ: torch.Tensor, delta_HQ: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient contribution of one key block, given the FINAL lse and delta = rowsum(dO * O) [H, Q].

    Returns fp32 (dq_QHD, dk_KGD, dv_KGD); dk/dv are summed over the query heads sharing a kv head.
    """
    H, G = q_QHD.shape[1], k_KGD.shape[1]
    s_HQK, q_HQD, k_HKD = _scores(q_QHD, k_KGD, mask_QK, scale)
    p_HQK = torch.exp(s_HQK - torch.where(torch.isinf(lse_HQ), 0.0, lse_HQ)[..., None])
    do_HQD = do_QHD.transpose(0, 1).float()
    v_HKD = repeat_kv(v_KGD, H).transpose(0, 1).float()
    dv_HKD = p_HQK.transpose(1, 2) @ do_HQD
    ds_HQK = p_HQK * (do_HQD @ v_HKD.transpose(1, 2) - delta_HQ[..., None])
    dq_HQD = (ds_HQK @ k_HKD) * scale
    dk_HKD = (ds_HQK.transpose(1, 2) @ q_HQD) * scale

    def fold(x_HKD):  # sum the H // G query heads that read each kv head
        K, D = x_HKD.shape[1], x_HKD.shape[2]
        return x_HKD.transpose(0, 1).reshape(K, G, H // G, D).sum(dim=2)

    return dq_HQD.transpose(0, 1), fold(dk_HKD), fold(dv_HKD)
