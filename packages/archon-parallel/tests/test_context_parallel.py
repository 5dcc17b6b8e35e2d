"""Ulysses and ring CP on gloo ranks against the single-process naive reference (fp32, fwd + bwd)."""

import pytest
import torch
from archon_attn import SdpaBackend, VarlenBackend, build_attn_meta, reference_attention
from archon_parallel.context_parallel import (
    cp_token_index,
    gather_sequence,
    get_cp_attention,
    shard_packed_batch,
    ulysses_kv_repeat,
)
from archon_parallel.testing import run_ranks

D = 8
CU = [0, 1, 2, 10, 11, 40, 41, 43]  # very different lengths, length-1 docs; 43 tokens needs padding
CU_EXACT = [0, 5, 6, 24]            # 24 tokens: no padding for cp 2 / 4


def _inputs(H, G, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, n, D, generator=g) for n in (H, G, G, H)]


def _cp_worker(rank, world, cases):
    results = []
    for impl, inner, H, G, cu, pad_multiple in cases:
        q, k, v, do = _inputs(H, G, cu[-1])
        attn = get_cp_attention(impl, inner, None)
        shard = shard_packed_batch(torch.tensor(cu), q, k, v, do, cp_rank=rank, cp_size=world,
                                   pad_multiple=pad_multiple, layout=attn.layout)
        q_l, k_l, v_l, do_l = shard.tensors
        xs = [x.clone().requires_grad_() for x in (q_l, k_l, v_l)]
        out = attn(*xs, shard.meta)
        out.backward(do_l)
        assert shard.tensors[0].shape[0] % pad_multiple == 0
        results.append([gather_sequence(t, shard) for t in (out.detach(), *(x.grad for x in xs))])
    errors = []
    if world == 2:
        q, k, v, _ = _inputs(3, 1, 8)
        shard = shard_packed_batch(torch.tensor([0, 8]), q, k, v, cp_rank=rank, cp_size=world)
        try:
            get_cp_attention("ulysses", SdpaBackend(), None)(*shard.tensors, shard.meta)
        except ValueError as e:
            errors.append(str(e))
        # gather_sequence backward: the gathered tensor is replicated, so grad = own slice
        x = shard.tensors[0].clone().requires_grad_()
        w = torch.arange(8 * 3 * D, dtype=torch.float32).view(8, 3, D)
        (gather_sequence(x, shard) * w).sum().backward()
        errors.append(torch.equal(x.grad, w[shard.index_L]))
    return results, errors


def _check(cases, outs):
    for case, (out, dq, dk, dv) in zip(cases, outs):
        impl, _, H, G, cu, _ = case
        q, k, v, do = _inputs(H, G, cu[-1])
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*xs, torch.tensor(cu))
        grads = torch.autograd.grad(ref, xs, do)
        for name, got, want in zip(["out", "dq", "dk", "dv"], (out, dq, dk, dv), (ref, *grads)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, c=case, n=name: f"{c} {n}: {m}")


def test_cp2_ulysses_and_ring_match_single_process():
    cases = [
        ("ulysses", SdpaBackend(), 4, 4, CU, 1),
        ("ulysses", VarlenBackend(), 4, 2, CU, 2),
        ("ulysses", SdpaBackend(), 4, 1, CU, 1),   # 1 kv head < cp: repeated to 2
        ("ulysses", SdpaBackend(), 2, 2, CU_EXACT, 1),
        ("ring", None, 4, 1, CU, 1),
        ("ring", None, 3, 3, CU, 2),                # 3 heads: ring is not limited by heads
        ("ring", None, 2, 2, CU_EXACT, 1),
    ]
    per_rank = run_ranks(_cp_worker, 2, cases, timeout=240)
    for rank_outs, _ in per_rank:
        _check(cases, rank_outs)
    errors = per_rank[0][1]
    assert "Ulysses context parallel size 2 must divide" in errors[0] and "pick cp in [1, 3]" in errors[0]
    assert errors[1] is True


def test_cp4_ring_and_ulysses_match_single_process():
    cases = [("ring", None, 2, 1, CU, 1), ("ulysses", SdpaBackend(), 4, 1, CU_EXACT, 2)]
    for rank_outs, _ in run_ranks(_cp_worker, 4, cases, timeout=240):
        _check(cases, rank_outs)


def test_ulysses_kv_repeat_rule():
    assert ulysses_kv_repeat(8, 8, 4) == 1
    assert ulysses_kv_repeat(8, 2, 4) == 2
    assert ulysses_kv_repeat(8, 1, 8) == 8
    assert ulysses_kv_repeat(12, 4, 6) == 3   # lcm(4, 6) = 12 kv heads, one per query head
    with pytest.raises(ValueError, match=r"pick cp in \[1, 2, 4, 8\]"):
        ulysses_kv_repeat(8, 2, 3)


@pytest.mark.parametrize("layout", ["contiguous", "load_balanced"])
def test_shard_packed_batch_covers_batch_and_masks_padding(layout):
    cu = torch.tensor(CU)
    T = CU[-1]
    tokens = torch.arange(100, 100 + T)
    loss_mask = torch.ones(T, dtype=torch.bool)
    cp, tp = 2, 3
    shards = [shard_packed_batch(cu, tokens, loss_mask, cp_rank=r, cp_size=cp, pad_multiple=tp, layout=layout)
              for r in range(cp)]
    T_pad = shards[0].meta.num_tokens
    assert T_pad % (cp * tp) == 0 and T_pad >= T and shards[0].meta.cu_seqlens.tolist() == CU + [T_pad]
    index = torch.cat([s.index_L for s in shards])
    assert sorted(index.tolist()) == list(range(T_pad))
    global_pos = build_attn_meta(torch.tensor(CU + [T_pad])).positions()
    for s in shards:
        tok, lm = s.tensors
        assert s.tensors[0].shape[0] % tp == 0
        assert torch.equal(s.valid_L, s.index_L < T) and torch.equal(lm, s.valid_L)
        assert torch.equal(tok[s.valid_L], 100 + s.index_L[s.valid_L])
        assert torch.equal(s.positions_L, global_pos[s.index_L])
    if layout == "load_balanced":
        C = T_pad // 4
        assert cp_token_index(T_pad, 0, cp, layout).tolist() == list(range(C)) + list(range(3 * C, 4 * C))


def test_shard_and_factory_errors():
    with pytest.raises(ValueError, match="valid values"):
        get_cp_attention("zigzag", SdpaBackend())
    with pytest.raises(ValueError, match="tokens on dim 0"):
        shard_packed_batch(torch.tensor([0, 4]), torch.zeros(5), cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match="cp_rank"):
        shard_packed_batch(torch.tensor([0, 4]), torch.zeros(4), cp_rank=2, cp_size=2)
    with pytest.raises(ValueError, match="layout"):
        shard_packed_batch(torch.tensor([0, 4]), torch.zeros(4), cp_rank=0, cp_size=2, layout="zigzag")


def _nccl_worker(rank, world, cases):
    torch.cuda.set_device(rank)
    group = torch.distributed.new_group(backend="nccl")
    results = []
    for impl, inner, H, G, cu, dtype in cases:
        q, k, v, do = (x.to("cuda", dtype) for x in _inputs(H, G, cu[-1]))
        attn = get_cp_attention(impl, inner, group)
        shard = shard_packed_batch(torch.tensor(cu, device="cuda"), q, k, v, do, cp_rank=rank, cp_size=world,
                                   layout=attn.layout)
        xs = [x.clone().requires_grad_() for x in shard.tensors[:3]]
        out = attn(*xs, shard.meta)
        out.backward(shard.tensors[3])
        results.append([gather_sequence(t, shard, group).float().cpu() for t in (out.detach(), *(x.grad for x in xs))])
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp2_nccl_matches_single_process():
    cu = [0, 1, 300, 301, 900, 1000]
    cases = [("ring", None, 4, 1, cu, torch.float32), ("ulysses", SdpaBackend(), 4, 2, cu, torch.float32),
             ("ring", None, 8, 2, cu, torch.bfloat16), ("ulysses", VarlenBackend(), 8, 2, cu, torch.bfloat16)]
    outs = run_ranks(_nccl_worker, 2, cases, timeout=300)[0]
    for case, got_all in zip(cases, outs):
        impl, _, H, G, cu, dtype = case
        xs = [x.double().requires_grad_() for x in _inputs(H, G, cu[-1])[:3]]
        ref = reference_attention(*xs, torch.tensor(cu))
        want_all = [t.float() for t in (ref, *torch.autograd.grad(ref, xs, _inputs(H, G, cu[-1])[3].double()))]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, got, want in zip(["out", "dq", "dk", "dv"], got_all, want_all):
            err = (got - want).abs().max().item()
            assert err <= tol * max(1.0, want.abs().max().item()), f"{impl} {dtype} {name}: {err}"
