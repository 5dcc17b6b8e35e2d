"""Chunked / vocab-parallel logprobs + entropy and their grads equal a naive full-vocab computation."""

import pytest
import torch
import torch.distributed as dist
from archon_parallel.testing import run_ranks
from archon_parallel.vocab_parallel import logprobs_entropy, vocab_parallel_logprobs_entropy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

T, V = 11, 12


def naive(logits_TV, labels_T):
    logp_TV = torch.log_softmax(logits_TV.double(), dim=-1)
    logprobs_T = logp_TV.gather(1, labels_T[:, None]).squeeze(1)
    entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
    return logprobs_T, entropy_T


def make_inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    w_lp, w_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return logits, labels, w_lp, w_ent


def grads(fn, logits, labels, w_lp, w_ent):
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = fn(x, labels)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach().float(), ent.detach().float(), x.grad.float()


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_dense_chunked_matches_naive(chunk):
    logits, labels, w_lp, w_ent = make_inputs()
    got = grads(lambda x, y: logprobs_entropy(x, y, chunk_size=chunk), logits, labels, w_lp, w_ent)
    want = grads(naive, logits, labels, w_lp, w_ent)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dense_bf16_upcasts_per_chunk():
    logits, labels, w_lp, w_ent = make_inputs(dtype=torch.bfloat16)
    lp, ent = logprobs_entropy(logits, labels, chunk_size=3)
    assert lp.dtype == torch.float32
    want_lp, want_ent = naive(logits.float(), labels)  # same bf16 values, exact math
    torch.testing.assert_close(lp, want_lp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent.float(), rtol=1e-5, atol=1e-5)


def test_only_logprobs_used_in_loss():
    logits, labels, _, _ = make_inputs(1)
    x = logits.clone().requires_grad_(True)
    logprobs_entropy(x, labels, chunk_size=4)[0].sum().backward()
    y = logits.clone().requires_grad_(True)
    naive(y, labels)[0].sum().backward()
    torch.testing.assert_close(x.grad, y.grad.float(), rtol=1e-5, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"logits must be \[T, V\]"):
        logprobs_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[T\]"):
        logprobs_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def vocab_parallel_rank(rank, world_size):
    """tp=world_size: local-shard API and DTensor API against the naive dense result."""
    logits, labels, w_lp, w_ent = make_inputs(2)
    shard = V // world_size
    start = rank * shard
    local = logits[:, start:start + shard].contiguous()
    out = {}
    out["local"] = grads(
        lambda x, y: vocab_parallel_logprobs_entropy(x, y, dist.group.WORLD, start, chunk_size=4),
        local, labels, w_lp, w_ent)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    x = distribute_tensor(logits.clone(), mesh, [Shard(1)]).requires_grad_(True)
    lp, ent = logprobs_entropy(x, labels, chunk_size=5)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    out["dtensor"] = (lp.detach(), ent.detach(), x.grad.full_tensor())
    return out


def test_vocab_parallel_tp2_matches_dense():
    results = run_ranks(vocab_parallel_rank, 2, timeout=240)
    logits, labels, w_lp, w_ent = make_inputs(2)
    want_lp, want_ent, want_grad = grads(naive, logits, labels, w_lp, w_ent)
    for rank, out in enumerate(results):
        lp, ent, g_local = out["local"]
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
        shard = V // 2
        torch.testing.assert_close(g_local, want_grad[:, rank * shard:(rank + 1) * shard], rtol=1e-5, atol=1e-5)
        lp, ent, g_full = out["dtensor"]
        torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_full, want_grad, rtol=1e-5, atol=1e-5)
