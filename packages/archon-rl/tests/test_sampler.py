"""KV-cache generation against a naive full-recompute reference, on a toy attention model that
speaks the kv_hook protocol (no archon model needed)."""

import pytest
import torch
import torch.nn.functional as F
from archon_rl import SamplingConfig, generate
from torch import nn

V, D, H, G = 23, 16, 4, 2


class ToyAttnLM(nn.Module):
    """Embedding + positional embedding -> one GQA attention layer -> LM head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = nn.Embedding(V, D), nn.Embedding(64, D)
        self.q, self.k, self.v = nn.Linear(D, H * 8), nn.Linear(D, G * 8), nn.Linear(D, G * 8)
        self.o, self.head = nn.Linear(H * 8, D), nn.Linear(D, V)
        self.scale = 8**-0.5

    def forward(self, ids_BS, pos_BS, kv_hook=None):
        B, S = ids_BS.shape
        x_TD = (self.emb(ids_BS) + self.pos(pos_BS)).reshape(B * S, D)
        q, k, v = self.q(x_TD).view(-1, H, 8), self.k(x_TD).view(-1, G, 8), self.v(x_TD).view(-1, G, 8)
        if kv_hook is not None:
            o = kv_hook(self, q, k, v)
        else:  # plain causal attention over each row
            o = F.scaled_dot_product_attention(q.view(B, S, H, 8).transpose(1, 2),
                                               k.view(B, S, G, 8).transpose(1, 2).repeat_interleave(H // G, 1),
                                               v.view(B, S, G, 8).transpose(1, 2).repeat_interleave(H // G, 1),
                                               is_causal=True, scale=self.scale).transpose(1, 2)
        return self.head(x_TD + self.o(o.reshape(B * S, -1))).view(B, S, V)


def _forward_fn(model):
    def fwd(ids_BS, pos_BS, hook, last_B):
        return model(ids_BS, pos_BS, hook)[torch.arange(ids_BS.shape[0]), last_B]
    return fwd


def _naive_greedy(model, prompt, n, stop):
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq])
            logp = model(ids, torch.arange(len(seq))[None])[0, -1].log_softmax(-1)
            tok = int(logp.argmax())
            seq.append(tok)
            lps.append(float(logp[tok]))
            if tok in stop:
                break
    return seq[len(prompt):], lps


@pytest.mark.parametrize("stop", [[], [5, 9]])
def test_kv_cache_greedy_equals_full_recompute(stop):
    model = ToyAttnLM().eval()
    prompts = [[1, 2, 3], [4], [7, 8, 9, 10, 11, 12], [3, 3]]
    out = generate(_forward_fn(model), prompts, SamplingConfig(max_new_tokens=9, temperature=0.0,
                                                               stop_token_ids=stop))
    for b, p in enumerate(prompts):
        want, want_lp = _naive_greedy(model, p, 9, stop)
        assert out.responses()[b] == want
        torch.testing.assert_close(torch.tensor(out.response_logprobs()[b]), torch.tensor(want_lp),
                                   atol=1e-5, rtol=0)
        assert bool(out.stopped_B[b]) == (bool(want) and want[-1] in stop)


def test_sampling_is_reproducible_with_a_generator_and_leaves_global_rng():
    model = ToyAttnLM().eval()
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, top_p=0.9, temperature=0.8)
    state = torch.get_rng_state()
    a = generate(_forward_fn(model), [[1, 2]] * 8, cfg, generator=torch.Generator().manual_seed(3))
    b = generate(_forward_fn(model), [[1, 2]] * 8, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens_BL, b.tokens_BL) and torch.equal(torch.get_rng_state(), state)
    assert len({tuple(r) for r in a.responses()}) > 1  # rows sample independently
    with pytest.raises(ValueError, match="at least one token"):
        generate(_forward_fn(model), [[1], []], cfg)


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=4),
                                 SamplingConfig(temperature=1.3, top_p=0.8)])
def test_seeded_gumbel_sampling_matches_the_distribution(cfg):
    """Per-sequence seeded sampling draws from the tempered, truncated softmax: empirical frequencies over
    20k seeds against the exact probabilities (top-k / top-p computed here independently)."""
    from archon_rl import sample_tokens, sequence_seeds

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 2
    scaled = logits / cfg.temperature
    keep = torch.ones(V, dtype=torch.bool)
    if cfg.top_k:
        keep &= scaled >= scaled.topk(cfg.top_k).values[-1]
    if cfg.top_p < 1:
        p_sorted, order = scaled.softmax(-1).sort(descending=True)
        before = p_sorted.cumsum(0) - p_sorted
        keep[order[before >= cfg.top_p]] = False
    want = torch.where(keep, scaled, torch.tensor(float("-inf"))).softmax(-1)
    n = 20_000
    tok, lp = sample_tokens(logits.expand(n, V), cfg, seeds_B=sequence_seeds(11, 2, range(n)), step=5)
    freq = torch.bincount(tok, minlength=V).float() / n
    assert bool((freq[~keep] == 0).all())
    # 5 standard errors of a binomial proportion (plus a floor for tiny probabilities)
    assert bool(((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-3).all()), (freq, want)
    torch.testing.assert_close(lp, logits.log_softmax(-1)[tok])  # behaviour logprobs: the raw distribution


def test_seeded_sampling_does_not_depend_on_the_batch():
    """A prompt generated alone or inside any batch (any position) gives the same tokens for the same seed,
    which is what makes rollouts independent of how prompts are split over data-parallel ranks."""
    from archon_rl import sequence_seeds

    model = ToyAttnLM().eval()
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    prompts = [[1, 2, 3], [4], [7, 8, 9, 10], [3, 3], [5, 6]]
    full = generate(_forward_fn(model), prompts, cfg, seeds=sequence_seeds(7, 1, range(5)))
    part = generate(_forward_fn(model), [prompts[3], prompts[1]], cfg, seeds=sequence_seeds(7, 1, [3, 1]))
    assert part.responses() == [full.responses()[3], full.responses()[1]]
    other_step = generate(_forward_fn(model), prompts, cfg, seeds=sequence_seeds(7, 2, range(5)))
    assert other_step.responses() != full.responses()
    with pytest.raises(ValueError, match="one entry per prompt"):
        generate(_forward_fn(model), prompts, cfg, seeds=sequence_seeds(7, 1, range(4)))
