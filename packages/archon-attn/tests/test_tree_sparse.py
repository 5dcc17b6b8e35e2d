"""Ancestor attention and tree labels against flat per-sequence causal references.

Legend: N: tree tokens, T: flat tokens, H: query heads, G: kv heads, D: head dim, V: vocabulary.
"""

import pytest
import torch
from archon_attn.tree import (
    TreeAttention,
    TreeAttnMeta,
    build_tree,
    gather_tree_logprobs,
    tree_attention,
    tree_block_mask,
    tree_label_index,
    tree_mask_dense,
    tree_mask_mod,
    tree_model_inputs,
)
from archon_attn.tree.testing import grpo_batch, mixed_batch, multiturn_batch
from torch.nn.attention.flex_attention import create_mask


def _naive_ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """mask[i, j] = j is on the parent chain of i (itself included), walked up explicitly."""
    N = parent.numel()
    mask = torch.zeros(N, N, dtype=torch.bool)
    cur, rows = torch.arange(N), torch.arange(N)
    while (cur >= 0).any():
        live = cur >= 0
        mask[rows[live], cur[live]] = True
        cur = torch.where(live, parent[cur.clamp(min=0)], -1)
    return mask


def _naive_causal(q_THD, k_TGD, v_TGD, scale):
    rep = q_THD.shape[1] // k_TGD.shape[1]
    k_THD, v_THD = k_TGD.repeat_interleave(rep, 1), v_TGD.repeat_interleave(rep, 1)
    s_HTT = torch.einsum("thd,shd->hts", q_THD, k_THD) * scale
    T = q_THD.shape[0]
    s_HTT = s_HTT.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hts,shd->thd", s_HTT.softmax(-1), v_THD)


def _trees():
    g = torch.Generator().manual_seed(0)
    return {
        "mixed": build_tree(mixed_batch(g)),
        "grpo": build_tree(grpo_batch(g, 2, 4, 40, 20)),  # N > 128: several mask blocks
        "multiturn": build_tree(multiturn_batch(g, 3, 4, 12)),
    }


TREES = _trees()


@pytest.mark.parametrize("name", sorted(TREES))
def test_masks_equal_naive_ancestor_walk(name):
    tree = TREES[name]
    ref_NN = _naive_ancestor_mask(tree.parent_N)
    assert torch.equal(tree_mask_dense(tree), ref_NN)
    N = tree.num_tree_tokens
    mm = tree_mask_mod(tree)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    assert torch.equal(mm(0, 0, i, j), ref_NN)
    assert torch.equal(create_mask(mm, None, None, N, N, device="cpu")[0, 0], ref_NN)


@pytest.mark.parametrize("name", sorted(TREES))
@pytest.mark.parametrize("block_size", [8, 16, 128])
def test_block_mask_structure(name, block_size):
    """Listed blocks cover every visible pair; full blocks hold only visible pairs."""
    tree = TREES[name]
    ref_NN = _naive_ancestor_mask(tree.parent_N)
    N, B = tree.num_tree_tokens, block_size
    nb = -(-N // B)
    pad_NN = torch.zeros(nb * B, nb * B, dtype=torch.bool)
    pad_NN[:N, :N] = ref_NN
    any_QK = pad_NN.view(nb, B, nb, B).any(3).any(1)
    bm = tree_block_mask(tree, block_size)
    listed_QK = torch.zeros(nb, nb, dtype=torch.bool)
    full_QK = torch.zeros(nb, nb, dtype=torch.bool)
    for q in range(nb):
        listed_QK[q, bm.kv_indices[0, 0, q, : bm.kv_num_blocks[0, 0, q]].long()] = True
        full_QK[q, bm.full_kv_indices[0, 0, q, : bm.full_kv_num_blocks[0, 0, q]].long()] = True
    assert not (listed_QK & full_QK).any()
    assert torch.equal(listed_QK | full_QK, any_QK)  # no visible pair missed, no empty block listed
    for q, k in full_QK.nonzero().tolist():
        qe, ke = min((q + 1) * B, N), min((k + 1) * B, N)
        assert ref_NN[q * B : qe, k * B : ke].all()


def _qkv(N, H=4, G=2, D=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, h, D, generator=g).requires_grad_(requires_grad) for h in (H, G, G)]


@pytest.mark.parametrize("name", sorted(TREES))
def test_dense_tree_attention_equals_per_sequence_causal(name):
    """Forward at every sequence's tokens, and q/k/v grads of the flat loss (shared tokens weighted by
    1 / multiplicity so flat and tree losses are the same function of the tree's q/k/v)."""
    tree, scale = TREES[name], 0.3
    q, k, v = _qkv(tree.num_tree_tokens, requires_grad=True)
    w_NHD = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    o_NHD = tree_attention(q, k, v, tree, scale=scale, impl="dense")
    (o_NHD * w_NHD).sum().backward()
    tree_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None

    mult_N = torch.bincount(tree.seq_index_T, minlength=tree.num_tree_tokens).float()
    flat_loss = 0.0
    for s in range(tree.num_sequences):
        idx = tree.sequence_index(s)
        o_THD = _naive_causal(q[idx], k[idx], v[idx], scale)
        torch.testing.assert_close(o_NHD[idx], o_THD, atol=1e-5, rtol=1e-5)
        flat_loss = flat_loss + (o_THD * w_NHD[idx] / mult_N[idx, None, None]).sum()
    flat_loss.backward()
    for got, x in zip(tree_grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TREES))
def test_flex_forward_equals_dense_on_cpu(name):
    tree = TREES[name]
    q, k, v = _qkv(tree.num_tree_tokens, seed=2)
    dense = tree_attention(q, k, v, tree, impl="dense")
    flex = tree_attention(q, k, v, tree, impl="flex")
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    meta = TreeAttnMeta.build(tree, "flex", block_size=16)  # prebuilt metadata and a small block size
    torch.testing.assert_close(TreeAttention("flex")(q, k, v, meta), dense, atol=1e-5, rtol=1e-5)


def test_attention_errors():
    tree = TREES["mixed"]
    q, k, v = _qkv(tree.num_tree_tokens, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        tree_attention(q, k, v, tree, impl="flex")
    with pytest.raises(ValueError, match="unknown tree attention impl"):
        tree_attention(q, k, v, tree, impl="sdpa")
    with pytest.raises(ValueError, match="tree tokens"):
        tree_attention(q[:-1], k, v, tree, impl="dense")


class TinyLM(torch.nn.Module):
    """Embedding + learned positions + one attention layer + LM head: enough to check tree == flat."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, max_pos=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(max_pos, dim, generator=g) * 0.5)
        self.wq = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * dim**-0.5)
        self.wkv = torch.nn.Parameter(torch.randn(dim, 2 * kv_heads * self.hd, generator=g) * dim**-0.5)
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) * dim**-0.5)

    def forward(self, ids, pos, attend):
        x = self.emb[ids] + self.pos[pos]
        q = (x @ self.wq).view(-1, self.heads, self.hd)
        k, v = (x @ self.wkv).view(-1, 2 * self.kv_heads, self.hd).chunk(2, dim=1)
        return (x + attend(q, k, v).reshape(x.shape)) @ self.head


def test_tree_logprobs_equal_flat_training():
    """Per-sequence next-token logprobs (flat layout) and parameter grads: tree == flat packed."""
    g = torch.Generator().manual_seed(4)
    seqs = [s % 64 for s in mixed_batch(g)]
    tree = build_tree(seqs)
    model = TinyLM()
    ids_N, pos_N = tree_model_inputs(tree)
    logits_NV = model(ids_N, pos_N, lambda q, k, v: tree_attention(q, k, v, tree, impl="dense"))
    labels = tree_label_index(tree)
    assert labels.num_pairs == tree.num_tree_tokens - int((tree.parent_N < 0).sum())
    lp_T = gather_tree_logprobs(logits_NV, labels, chunk_size=7)
    w_T = torch.randn(lp_T.shape, generator=g)
    (lp_T * w_T).sum().backward()
    tree_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    flat = []
    for s in seqs:
        logits_TV = model(s, torch.arange(len(s)), lambda q, k, v: _naive_causal(q, k, v, 8**-0.5))
        lp = logits_TV[:-1].log_softmax(-1).gather(1, s[1:, None]).squeeze(1)
        flat.append(torch.cat([lp, lp.new_zeros(1)]))
    flat_T = torch.cat(flat)
    torch.testing.assert_close(lp_T, flat_T, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels.flat_labels_T[labels.flat_pair_T >= 0], torch.cat([s[1:] for s in seqs]))
    assert torch.equal(labels.cu_seqlens, torch.tensor([0] + [len(s) for s in seqs]).cumsum(0))
    (flat_T * w_T).sum().backward()
    for got, p in zip(tree_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-5)
    # The callable form (rows computed on demand) gives the same values; temperature scales logits.
    lp2 = gather_tree_logprobs(lambda idx: logits_NV[idx] * 2.0, labels, temperature=2.0)
    torch.testing.assert_close(lp2, lp_T.detach(), atol=1e-5, rtol=1e-5)
