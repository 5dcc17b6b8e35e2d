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
