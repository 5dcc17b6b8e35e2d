"""Compiled FlexAttention tree attention on CUDA (forward and backward) against the dense SDPA path.

Legend: N: tree tokens, H: query heads, G: kv heads, D: head dim.
"""

import pytest
import torch
from archon_attn.tree import TreeAttnMeta, build_tree, tree_attention
from archon_attn.tree.testing import grpo_batch, multiturn_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(impl, tree, q, k, v, w, meta=None):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = tree_attention(q, k, v, meta or tree, impl=impl)
    (o.float() * w).sum().backward()
    return o.detach().float(), [x.grad.float() for x in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_fwd_bwd_equals_dense_cuda(dtype):
    g = torch.Generator().manual_seed(0)
    seqs = grpo_batch(g, 3, 5, 300, 200, vocab=1000) + multiturn_batch(g, 2, 4, 60, vocab=1000)
    tree = build_tree(seqs, device="cuda")
    N, H, G, D = tree.num_tree_tokens, 8, 2, 64
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(N, h, D, device="cuda", generator=gen, dtype=dtype) for h in (H, G, G))
    w = torch.randn(N, H, D, device="cuda", generator=gen)
    # The reference runs the dense masked SDPA in float64 on the same (rounded) inputs.
    ref_o, ref_g = _run("dense", tree, q.double(), k.double(), v.double(), w.double())
    o, grads = _run("flex", tree, q, k, v, w, meta=TreeAttnMeta.build(tree, "flex"))
    # fp32 flex uses a different summation order (online softmax in blocks) from SDPA: 1e-4 covers the
    # accumulation error at N ~ 2.5k; bf16 outputs carry ~3 significant digits.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(o, ref_o.float(), atol=tol, rtol=tol)
    for got, ref in zip(grads, ref_g):
        torch.testing.assert_close(got, ref.float(), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("C,Q", [(0, 64), (300, 1), (300, 77), (1024, 512)])
def test_flash_prefix_attention_equals_naive_cuda(C, Q):
    """DTA's prefix attention on CUDA bf16 (FlashAttention, bottom-right causal) against a float64 masked-softmax
    reference: outputs and the gradients of q, k, v and of the cached prefix."""
    from archon_attn.tree.dta import prefix_attention

    H, G, D = 8, 2, 64
    gen = torch.Generator(device="cuda").manual_seed(C + Q)
    q, k, v = (torch.randn(Q, h, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (H, G, G))
    kc, vc = (torch.randn(C, G, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(Q, H, D, device="cuda", generator=gen)

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o = fn(*xs)
        (o.float() * w.to(o.dtype)).sum().backward()
        return o.detach().float(), [x.grad.float() if x.grad is not None else torch.zeros_like(x, dtype=torch.float)
                                    for x in xs]  # an empty cache gets no grad

    def naive(q, k, v, kc, vc):
        kk, vv = torch.cat([kc, k]).repeat_interleave(H // G, 1), torch.cat([vc, v]).repeat_interleave(H // G, 1)
        s = torch.einsum("qhd,khd->hqk", q, kk) * 0.2
        allowed = torch.arange(C + Q, device="cuda")[None] <= torch.arange(Q, device="cuda")[:, None] + C
        return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), vv)

    o, grads = run(lambda *xs: prefix_attention(*xs, scale=0.2), q, k, v, kc, vc)
    ref_o, ref_g = run(naive, *(x.double() for x in (q, k, v, kc, vc)))
    torch.testing.assert_close(o, ref_o.float(), atol=2e-2, rtol=2e-2)
    for got, ref in zip(grads, ref_g):
        torch.testing.assert_close(got, ref.float(), atol=5e-2, rtol=5e-2)


def test_flash_prefix_attention_packed_siblings_cuda():
    """Siblings packed in one DTA call (FlashAttention, keys laid out [cache; own] per sibling) against each sibling
    run alone through the same kernel: outputs and every gradient, including the cache's summed over siblings."""
    from archon_attn.tree.dta import prefix_attention

    H, G, D, C, segs = 8, 2, 64, 300, [77, 1, 130]
    gen = torch.Generator(device="cuda").manual_seed(5)
    Q = sum(segs)
    xs = [torch.randn(n, h, D, device="cuda", generator=gen, dtype=torch.bfloat16)
          for n, h in ((Q, H), (Q, G), (Q, G), (C, G), (C, G))]
    w = torch.randn(Q, H, D, device="cuda", generator=gen)

    def grads(packed: bool):
        q, k, v, kc, vc = (x.detach().clone().requires_grad_() for x in xs)
        if packed:
            o = prefix_attention(q, k, v, kc, vc, scale=0.2, seg_lens=segs)
        else:
            bounds = [0, segs[0], segs[0] + segs[1], Q]
            o = torch.cat([prefix_attention(q[a:b], k[a:b], v[a:b], kc, vc, scale=0.2)
                           for a, b in zip(bounds, bounds[1:])])
        (o.float() * w).sum().backward()
        return [o.float()] + [x.grad.float() for x in (q, k, v, kc, vc)]

    for got, ref in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
