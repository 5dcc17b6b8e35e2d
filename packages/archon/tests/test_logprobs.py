"""The chunked LM-head logprob/entropy Function against a float64 log_softmax reference: values and the
gradients of hidden states and head weight, for every chunking, with and without the entropy term, eager
and compiled ('aot_eager' on CPU), keeping the last chunk's logits or recomputing them."""

import pytest
import torch
from archon.engine.logprobs import head_logprobs
from torch.utils._python_dispatch import TorchDispatchMode

T, D, V = 13, 16, 50


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    y = torch.randint(0, V, (T,), generator=g)
    g_lp = torch.randn(T, generator=g)
    g_ent = torch.randn(T, generator=g)
    return h, w, y, g_lp, g_ent


def _reference(h, w, y, g_lp, g_ent, use_entropy):
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    logp = (h @ w.t()).log_softmax(-1)
    lp = logp.gather(1, y[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    loss = (lp * g_lp.double()).sum() + ((ent * g_ent.double()).sum() if use_entropy else 0.0)
    loss.backward()
    return lp, ent, h.grad, w.grad


@pytest.mark.parametrize("chunk", [5, 13, 64])
@pytest.mark.parametrize("use_entropy", [False, True])
@pytest.mark.parametrize("keep_last", [False, True])
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_head_logprobs_match_log_softmax(chunk, use_entropy, keep_last, backend):
    h, w, y, g_lp, g_ent = _inputs()
    want = _reference(h, w, y, g_lp, g_ent, use_entropy)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = head_logprobs(hh, ww, y, chunk_size=chunk, want_entropy=True, keep_last_logits=keep_last,
                            compile_backend=backend)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if use_entropy else 0.0)
    loss.backward()
    for name, got, ref in [("logprobs", lp, want[0]), ("entropy", ent, want[1]), ("dh", hh.grad, want[2]),
                           ("dw", ww.grad, want[3])]:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


def test_without_entropy_returns_zeros_and_exact_logprob_grads():
    h, w, y, g_lp, g_ent = _inputs(1)
    want = _reference(h, w, y, g_lp, g_ent, use_entropy=False)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = head_logprobs(hh, ww, y, chunk_size=4, want_entropy=False)
    assert torch.equal(ent, torch.zeros(T))
    (lp * g_lp).sum().backward()
    torch.testing.assert_close(lp.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ww.grad.double(), want[3], rtol=1e-5, atol=1e-5)


class _CountMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.mm += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep_last,chunk,backward_mms", [(True, 64, 2), (False, 64, 3), (True, 5, 3 * 2 + 2),
                                                         (False, 5, 3 * 3)])
def test_kept_logits_skip_the_recompute(keep_last, chunk, backward_mms):
    """Backward of a chunk is two matmuls (dh, dw) plus one to rebuild the logits, except for a kept last chunk."""
    h, w, y, g_lp, _ = _inputs(2)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, _ = head_logprobs(hh, ww, y, chunk_size=chunk, keep_last_logits=keep_last)
    with _CountMM() as count:
        (lp * g_lp).sum().backward()
    assert count.mm == backward_mms


def test_autocast_casts_once_and_matches_reference():
    """CPU autocast bf16: the matmuls run in bf16 (close to the fp64 reference at bf16 precision) and the fp32
    weight's gradient arrives in fp32."""
    h, w, y, g_lp, g_ent = _inputs(3)
    want = _reference(h, w, y, g_lp, g_ent, use_entropy=True)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = head_logprobs(hh, ww, y, chunk_size=5, want_entropy=True, keep_last_logits=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    assert lp.dtype == ent.dtype == torch.float32 and ww.grad.dtype == torch.float32
    for got, ref in zip((lp, ent, hh.grad, ww.grad), want):
        err = (got.double() - ref).abs().max().item()
        assert err < 0.05 * max(1.0, ref.abs().max().item()), err


def test_no_grad_forward_matches_and_bad_chunk_is_rejected():
    h, w, y, g_lp, g_ent = _inputs(4)
    want = _reference(h, w, y, g_lp, g_ent, use_entropy=True)
    with torch.no_grad():
        lp, ent = head_logprobs(h, w, y, chunk_size=3, want_entropy=True, keep_last_logits=True)
    torch.testing.assert_close(lp.double(), want[0].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want[1].detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk size"):
        head_logprobs(h, w, y, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [None, "inductor"])
def test_cuda_bf16_head_matches_reference(backend):
    """The engine's CUDA path: autocast bf16, a large vocab, the softmax kernels compiled by inductor or eager."""
    g = torch.Generator().manual_seed(5)
    n, d, v = 700, 256, 32000
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.05
    y = torch.randint(0, v, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    want = _reference(h, w, y, g_lp, g_ent, use_entropy=True)
    hh, ww = h.cuda().requires_grad_(), w.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp, ent = head_logprobs(hh, ww, y.cuda(), chunk_size=256, want_entropy=True, keep_last_logits=True,
                                compile_backend=backend)
    ((lp * g_lp.cuda()).sum() + (ent * g_ent.cuda()).sum()).backward()
    for name, got, ref in zip(["logprobs", "entropy", "dh", "dw"], (lp, ent, hh.grad, ww.grad), want):
        err = (got.double().cpu() - ref).abs().max().item()
        assert err < 0.03 * max(1.0, ref.abs().max().item()), f"{name}: {err}"


def _tp_head_rank(rank, world, chunk, use_entropy, keep_last, backend):
    """One rank of a vocab-parallel head: this rank's vocab shard (uneven: V = 50 over 3 ranks is 17/17/16) of
    the weight, the full hidden states; returns the outputs, the summed hidden-state gradient, the shard's
    weight gradient."""
    h, w, y, g_lp, g_ent = _inputs(7)
    per = -(-V // world)
    start = rank * per
    hh, ww = h.clone().requires_grad_(), w[start:start + per].clone().requires_grad_()
    lp, ent = head_logprobs(hh, ww, y, chunk_size=chunk, want_entropy=True, keep_last_logits=keep_last,
                            compile_backend=backend, tp_group=torch.distributed.group.WORLD, vocab_start=start)
    ((lp * g_lp).sum() + ((ent * g_ent).sum() if use_entropy else 0.0)).backward()
    dh = hh.grad.clone()
    torch.distributed.all_reduce(dh)  # each shard's hidden-state gradient is a partial sum
    return lp.detach(), ent.detach(), dh, ww.grad


@pytest.mark.parametrize("chunk,use_entropy,keep_last,backend", [(5, True, True, None), (64, False, False, None),
                                                                  (4, True, False, "aot_eager")])
def test_vocab_parallel_head_matches_log_softmax(chunk, use_entropy, keep_last, backend):
    """3 gloo ranks, uneven vocab shards, labels on every shard: outputs on every rank and the hidden-state and
    weight-shard gradients equal the full-vocab float64 reference."""
    from archon_parallel.testing import run_ranks

    h, w, y, g_lp, g_ent = _inputs(7)
    want = _reference(h, w, y, g_lp, g_ent, use_entropy)
    per = -(-V // 3)
    results = run_ranks(_tp_head_rank, 3, chunk, use_entropy, keep_last, backend, timeout=240)
    for rank, (lp, ent, dh, dw) in enumerate(results):
        torch.testing.assert_close(lp.double(), want[0].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), want[1].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dh.double(), want[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw.double(), want[3][rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)
