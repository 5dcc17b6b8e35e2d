"""The fused decode ops (`TorchDecodeKernels`, and the Triton kernels: interpreted on CPU, compiled on CUDA)
against naive per-element math in float64: RMSNorm with and without the residual add, per-head q/k norm + RoPE,
SwiGLU's gate, and the K/V store + attention over each row's slot (odd sizes: masks on every dim)."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from archon_rl import TorchDecodeKernels, select_decode_kernels, triton_runs_here

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
TRITON_HERE = triton_runs_here()
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    if request.param == "torch":
        return TorchDecodeKernels()
    if not TRITON_HERE:
        pytest.skip("Triton on CPU runs interpreted in a fresh process: test_triton_kernels_interpreted")
    from archon_rl.triton_decode import TritonDecodeKernels

    return TritonDecodeKernels()


def _naive_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return w.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def _naive_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (i, i + D/2) of every head: x [T, H, D], cos/sin [T, D]."""
    out = torch.empty_like(x, dtype=torch.float64)
    h = x.shape[-1] // 2
    for i in range(h):
        a, b = x[..., i].double(), x[..., i + h].double()
        out[..., i] = a * cos[:, None, i].double() - b * sin[:, None, i].double()
        out[..., i + h] = b * cos[:, None, i + h].double() + a * sin[:, None, i + h].double()
    return out


def _naive_attention(q, k_cache, v_cache, pos, scale):
    """Row b attends to its slot's positions 0..pos[b] (the new K/V already stored), one head at a time."""
    B, H, D = q.shape
    G = k_cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(pos[b]) + 1
        for h in range(H):
            g = h // (H // G)
            s = (k_cache[b, g, :n].double() @ q[b, h].double()) * scale
            out[b, h] = torch.softmax(s, 0) @ v_cache[b, g, :n].double()
    return out


def _rand(*shape):
    return torch.randn(*shape, device=DEVICE)


def test_norms_and_gate(kernels):
    torch.manual_seed(0)
    h, d, w = _rand(5, 40), _rand(5, 40), _rand(40)
    h_new, y = kernels.add_rms_norm(h, d, w, EPS)
    torch.testing.assert_close(h_new.double().cpu(), (h + d).double().cpu(), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.double().cpu(), _naive_rms(h + d, w).cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.rms_norm(h, w, EPS).double().cpu(), _naive_rms(h, w).cpu(), atol=1e-5,
                               rtol=1e-5)
    a, b = _rand(3, 70), _rand(3, 70)
    want = a.double() * torch.sigmoid(a.double()) * b.double()
    torch.testing.assert_close(kernels.silu_mul(a, b).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk-norm", "no-norm"])
def test_qk_norm_rope(kernels, qk_norm):
    torch.manual_seed(1)
    T, H, G, D = 3, 4, 2, 24
    q, k, qw, kw = _rand(T, H, D), _rand(T, G, D), _rand(D), _rand(D)
    ang = torch.rand(T, D // 2, device=DEVICE) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    got_q, got_k = kernels.qk_norm_rope(q, k, qw if qk_norm else None, kw if qk_norm else None, EPS, cos, sin,
                                        torch.float32)
    nq, nk = (_naive_rms(q, qw), _naive_rms(k, kw)) if qk_norm else (q, k)
    torch.testing.assert_close(got_q.double(), _naive_rope(nq, cos, sin), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.double(), _naive_rope(nk, cos, sin), atol=1e-5, rtol=1e-5)


def test_attend_and_store(kernels):
    """Rows at position 0 (only their own key), inside the first block, on a block edge and past several
    blocks; R = 3 query heads per kv head; slots beyond the batch and positions beyond pos stay untouched."""
    torch.manual_seed(2)
    N, G, S, D, H = 6, 2, 150, 24, 6
    k_cache, v_cache = _rand(N, G, S, D), _rand(N, G, S, D)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    pos = torch.tensor([0, 5, 64, 130], device=DEVICE)
    B = pos.numel()
    q, k, v = _rand(B, H, D), _rand(B, G, D), _rand(B, G, D)
    scale = 1 / math.sqrt(D)
    o = kernels.attend_and_store(q, k, v, k_cache, v_cache, pos, 144, scale)
    want_k, want_v = before_k.clone(), before_v.clone()
    for b in range(B):
        want_k[b, :, pos[b]], want_v[b, :, pos[b]] = k[b], v[b]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    torch.testing.assert_close(o.double().cpu(), _naive_attention(q.cpu(), want_k.cpu(), want_v.cpu(), pos.cpu(),
                                                                  scale), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_TRITON or TRITON_HERE, reason="the Triton cases ran in this process")
@pytest.mark.timeout(300)
def test_triton_kernels_interpreted():
    """The Triton cases of this file, interpreted on CPU in a fresh process: ``TRITON_INTERPRET`` must be set
    before the kernels are defined, and compiled code of other tests in this process can disturb the interpreter."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                        "triton and not interpreted"], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_select():
    cpu = torch.device("cpu")
    assert select_decode_kernels("auto", cpu) is None  # CPU decodes with the model's own forward
    assert select_decode_kernels("none", cpu) is None
    assert isinstance(select_decode_kernels("torch", cpu), TorchDecodeKernels)
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_decode_kernels("cuda", cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_kernels_match_the_reference(dtype):
    """Compiled Triton kernels on the GPU against the eager reference: fp32 to 1e-5, bf16 to a few roundings, on
    the 0.6B shape (16 query heads, 8 kv heads, head dim 128) with rows spanning many attention blocks."""
    from archon_rl.triton_decode import TritonDecodeKernels

    ref, tri = TorchDecodeKernels(), TritonDecodeKernels()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    T, D, H, G, Dh, F = 64, 1024, 16, 8, 128, 3072
    h, d, w = rand(T, D), rand(T, D), rand(D)
    for a, b in zip(ref.add_rms_norm(h, d, w, EPS), tri.add_rms_norm(h, d, w, EPS)):
        torch.testing.assert_close(b.float(), a.float(), **tol)
    # the matmul input written in the autocast dtype directly: the same bits as casting the fp32 result
    got, want = tri.rms_norm(h, w, EPS, torch.bfloat16), ref.rms_norm(h, w, EPS, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and (got.float() - want.float()).abs().max() <= (want.float().abs() / 64).max()
    a1, a2 = rand(T, F), rand(T, F)
    torch.testing.assert_close(tri.silu_mul(a1, a2).float(), ref.silu_mul(a1, a2).float(), **tol)
    q, k, qw, kw = rand(T, H, Dh), rand(T, G, Dh), rand(Dh), rand(Dh)
    ang = torch.rand(T, Dh // 2, device="cuda", generator=g) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    for a, b in zip(ref.qk_norm_rope(q, k, qw, kw, EPS, cos, sin, dtype), tri.qk_norm_rope(q, k, qw, kw, EPS, cos,
                                                                                          sin, dtype)):
        torch.testing.assert_close(b.float(), a.float(), **tol)
    N, S = 80, 1024
    kc, vc = rand(N, G, S, Dh), rand(N, G, S, Dh)
    kc2, vc2 = kc.clone(), vc.clone()
    pos = torch.randint(0, 1000, (T,), device="cuda", generator=g)
    qb, kb, vb = rand(T, H, Dh), rand(T, G, Dh), rand(T, G, Dh)
    want = ref.attend_and_store(qb, kb, vb, kc, vc, pos, 1024, Dh**-0.5)
    got = tri.attend_and_store(qb, kb, vb, kc2, vc2, pos, 1024, Dh**-0.5)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
