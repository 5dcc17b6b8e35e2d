"""GPU kernels (flash varlen, compiled flex) against the fp32 reference in bf16; skipped on CPU."""

import pytest
import torch
from archon_attn import (
    FlexBackend,
    SdpaBackend,
    VarlenBackend,
    build_attn_meta,
    has_public_varlen_attn,
    reference_attention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LENGTHS = [1, 700, 1, 3, 129, 1500, 64, 1, 300]
BF16_ATOL = 2e-2  # bf16 inputs and outputs: ~3 significant digits on O(1) values


def _case(H, G, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, n, D, generator=g) for n in (H, G, G))
    do = torch.randn(T, H, D, generator=g)
    return cu, q, k, v, do


def _run(backend, cu, q, k, v, do, dtype):
    meta = build_attn_meta(cu.cuda())
    xs = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
    out = backend(*xs, meta)
    grads = torch.autograd.grad(out, xs, do.to("cuda", dtype))
    return [t.float().cpu() for t in (out, *grads)]


def _impls():
    impls = ["aten"]
    if has_public_varlen_attn():
        impls.append("public")
    return impls


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("backend", [VarlenBackend(impl=i) for i in _impls()] + [FlexBackend(), SdpaBackend()],
                         ids=lambda b: f"{b.name}-{getattr(b, 'impl', '')}")
def test_bf16_kernels_match_fp32_reference(backend, heads):
    H, G = heads
    cu, q, k, v, do = _case(H, G)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*xs, cu)
    ref_all = [t.float() for t in (ref, *torch.autograd.grad(ref, xs, do.double()))]
    got_all = _run(backend, cu, q, k, v, do, torch.bfloat16)
    for name, got, want in zip(["out", "dq", "dk", "dv"], got_all, ref_all):
        err = (got - want).abs().max().item()
        assert err < BF16_ATOL * max(1.0, want.abs().max().item()), f"{backend} {name}: max abs err {err}"


def test_varlen_matches_sdpa_bf16():
    cu, q, k, v, do = _case(8, 2, seed=1)
    a = _run(VarlenBackend(), cu, q, k, v, do, torch.bfloat16)
    b = _run(SdpaBackend(), cu, q, k, v, do, torch.bfloat16)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() < BF16_ATOL * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_one_document_batches_take_sdpa_and_match_flash(heads):
    H, G = heads
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 2048], dtype=torch.int32)
    q, k, v = (torch.randn(2048, n, 128, generator=g) for n in (H, G, G))
    do = torch.randn(2048, H, 128, generator=g)
    one_doc = _run(VarlenBackend(), cu, q, k, v, do, torch.bfloat16)
    flash = _run(VarlenBackend(one_document_sdpa=False), cu, q, k, v, do, torch.bfloat16)
    for x, y in zip(one_doc, flash):
        assert (x - y).abs().max().item() < BF16_ATOL * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("impl", _impls())
def test_flash_varlen_with_seqlen_bound_is_exact(impl):
    """pad_to_maximum hands flash the padded length as its max_seqlen (a bound): the same results (up to the
    order of flash's atomic dq accumulation)."""
    cu, q, k, v, do = _case(8, 2, seed=2)
    xs = [x.to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v)]
    results = []
    for bound in (None, 4096):
        meta = build_attn_meta(cu.cuda())
        meta.seqlen_bound = bound
        out = VarlenBackend(impl=impl, one_document_sdpa=False)(*xs, meta)
        results.append([out, *torch.autograd.grad(out, xs, do.to("cuda", torch.bfloat16))])
    for x, y in zip(*results):
        assert (x - y).abs().max().item() < BF16_ATOL * max(1.0, y.abs().max().item())


def test_fp32_cuda_varlen_uses_dense_path_exactly():
    cu, q, k, v, do = _case(4, 2, D=16, seed=2)
    got = _run(VarlenBackend(), cu, q, k, v, do, torch.float32)
    want = _run(SdpaBackend(mode="dense"), cu, q, k, v, do, torch.float32)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_varlen_aten_custom_op_compiles():
    cu, q, k, v, do = _case(8, 2, seed=3)
    backend = VarlenBackend(impl="aten")
    compiled = torch.compile(lambda *a: backend(*a), fullgraph=False)
    meta = build_attn_meta(cu.cuda())
    xs = [x.to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = compiled(*xs, meta)
    eager = backend(*[x.detach() for x in xs], meta)
    assert (out.float() - eager.float()).abs().max().item() < 1e-3
    out.backward(do.to("cuda", torch.bfloat16))
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
