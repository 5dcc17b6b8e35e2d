"""Blockwise attention with lse merge against the naive reference, forward and backward (CPU fp32)."""

import torch
from archon_attn import (
    block_attention_backward,
    block_attention_forward,
    build_attn_meta,
    merge_partial_attention,
    reference_attention,
)


def test_split_keys_merge_equals_full_attention_and_grads():
    cu = torch.tensor([0, 1, 9, 10, 30], dtype=torch.int32)
    T, H, G, D, scale = 30, 4, 2, 8, 0.35
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(T, n, D, generator=g) for n in (H, G, G, H))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*xs, cu, scale=scale)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, xs, do)

    doc = build_attn_meta(cu).doc_ids()
    pos = torch.arange(T)
    mask_TT = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    splits = [slice(0, 7), slice(7, 22), slice(22, 30)]  # key blocks in an unusual order below
    o = torch.zeros(T, H, D)
    lse = torch.full((H, T), float("-inf"))
    for s in (splits[2], splits[0], splits[1]):
        part_o, part_lse = block_attention_forward(q, k[s], v[s], mask_TT[:, s], scale)
        o, lse = merge_partial_attention(o, lse, part_o, part_lse)
    torch.testing.assert_close(o, ref.detach(), atol=1e-5, rtol=1e-5)

    delta = (do * o).sum(-1).transpose(0, 1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for s in splits:
        bq, bk, bv = block_attention_backward(do, q, k[s], v[s], mask_TT[:, s], scale, lse, delta)
        dq += bq
        dk[s] += bk
        dv[s] += bv
    for got, want in [(dq, ref_dq), (dk, ref_dk), (dv, ref_dv)]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
