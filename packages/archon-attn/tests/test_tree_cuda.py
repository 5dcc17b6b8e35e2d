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
