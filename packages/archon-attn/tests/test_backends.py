"""All attention backends against the naive per-document reference (CPU, fp32, fwd + bwd)."""

import logging

import pytest
import torch
from archon_attn import (
    AttentionBackend,
    FlexBackend,
    SdpaBackend,
    VarlenBackend,
    build_attn_meta,
    get_attention_backend,
    reference_attention,
)

# Very different lengths, length-1 documents, an empty document, one partial trailing block.
CU_SEQLENS = [
    [0, 1, 2, 10, 11, 40, 41, 43],
    [0, 37],
    [0, 5, 5, 9, 70],
]
HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads H, kv heads G)
D = 8


def make_qkv(T, H, G, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, n, D, generator=g).to(device=device, dtype=dtype) for n in (H, G, G))
    return [x.requires_grad_() for x in (q, k, v)]


def backends():
    return [SdpaBackend(), SdpaBackend(mode="dense"), VarlenBackend(), FlexBackend(block_size=16),
            get_attention_backend("varlen")]


@pytest.mark.parametrize("cu", CU_SEQLENS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_forward_backward_match_reference(cu, heads, scale):
    H, G = heads
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    meta = build_attn_meta(cu_seqlens)
    q, k, v = make_qkv(cu[-1], H, G)
    ref = reference_attention(q, k, v, cu_seqlens, scale=scale)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for backend in backends():
        out = backend(q, k, v, meta, scale=scale)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")
        grads = torch.autograd.grad(out, (q, k, v), do)
        for name, g, rg in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend, n=name: f"{b} d{n}: {m}")


@pytest.mark.parametrize("cu", CU_SEQLENS)
@pytest.mark.parametrize("block_size", [16, 128])
def test_flex_cpu_forward_runs_real_flex(cu, block_size):
    H, G = 4, 2
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    meta = build_attn_meta(cu_seqlens)
    q, k, v = (x.detach() for x in make_qkv(cu[-1], H, G, seed=1))
    with torch.no_grad():
        out = FlexBackend(block_size=block_size)(q, k, v, meta)
    assert ("flex_block_mask", q.device, block_size) in meta.cache
    torch.testing.assert_close(out, reference_attention(q, k, v, cu_seqlens), atol=1e-5, rtol=1e-5)


def test_flex_block_mask_matches_dense_mask():
    from archon_attn import document_causal_block_mask
    from archon_attn.sdpa import _dense_mask
    from torch.nn.attention.flex_attention import create_mask

    meta = build_attn_meta(torch.tensor([0, 1, 2, 17, 18, 50, 51, 64, 100], dtype=torch.int32))
    bm = document_causal_block_mask(meta, torch.device("cpu"), block_size=16)
    dense = bm.to_dense()[0, 0]  # [Q, K] block occupancy: 1 where partial or full
    T = meta.num_tokens
    want = _dense_mask(meta, torch.device("cpu"))
    got = create_mask(bm.mask_mod, None, None, T, T, device="cpu")[0, 0]
    assert torch.equal(got, want)
    # every allowed token pair lies in a selected block, and no empty block is selected
    blocks = torch.nn.functional.pad(want, (0, 112 - T, 0, 112 - T)).view(7, 16, 7, 16).any(3).any(1)
    assert torch.equal(dense.bool(), blocks)


def test_flex_cpu_grad_raise_and_fallback_log(caplog):
    meta = build_attn_meta(torch.tensor([0, 3, 8], dtype=torch.int32))
    q, k, v = make_qkv(8, 2, 1)
    with pytest.raises(ValueError, match="no backward on CPU"):
        FlexBackend(cpu_grad="raise")(q, k, v, meta)
    backend = FlexBackend()
    with caplog.at_level(logging.INFO, logger="archon_attn.flex"):
        backend(q, k, v, meta)
        backend(q, k, v, meta)
    assert sum("dense-mask SDPA" in r.message for r in caplog.records) == 1


def test_masks_cached_per_meta():
    meta = build_attn_meta(torch.tensor([0, 3, 8], dtype=torch.int32))
    q, k, v = make_qkv(8, 2, 2)
    SdpaBackend(mode="dense")(q, k, v, meta)
    mask = meta.cache[("dense_doc_causal_mask", q.device)]
    SdpaBackend(mode="dense")(q, k, v, meta)
    assert meta.cache[("dense_doc_causal_mask", q.device)] is mask and meta.doc_ids() is meta.doc_ids()


def test_registry_and_errors():
    for name in ("sdpa", "varlen", "flex"):
        backend = get_attention_backend(name)
        assert isinstance(backend, AttentionBackend) and backend.name == name
    with pytest.raises(ValueError, match=r"'flex', 'sdpa', 'varlen'"):
        get_attention_backend("flash3")
    meta = build_attn_meta(torch.tensor([0, 4], dtype=torch.int32))
    q, k, v = make_qkv(4, 3, 2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        SdpaBackend()(q, k, v, meta)
    q, k, v = make_qkv(5, 2, 2)
    with pytest.raises(ValueError, match="meta describes 4 tokens"):
        SdpaBackend()(q, k, v, meta)
    with pytest.raises(ValueError, match="mode"):
        SdpaBackend(mode="blocky")


def test_build_attn_meta():
    meta = build_attn_meta(torch.tensor([0, 2, 2, 7], dtype=torch.int64))
    assert meta.cu_seqlens.dtype == torch.int32 and meta.max_seqlen == 5 and meta.num_docs == 3
    assert meta.doc_ids().tolist() == [0, 0, 2, 2, 2, 2, 2]
    assert meta.positions().tolist() == [0, 1, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="start at 0"):
        build_attn_meta(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        build_attn_meta(torch.tensor([0, 4, 3]))
    with pytest.raises(TypeError, match="int32"):
        build_attn_meta(torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="1-D"):
        build_attn_meta(torch.tensor([0]))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_one_document_sdpa_matches_reference(heads, scale):
    from archon_attn.varlen import causal_sdpa_one_document

    H, G = heads
    cu_seqlens = torch.tensor([0, 53], dtype=torch.int32)
    q, k, v = make_qkv(53, H, G, seed=4)
    ref = reference_attention(q, k, v, cu_seqlens, scale=scale)
    do = torch.randn_like(ref)
    out = causal_sdpa_one_document(q, k, v, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)
