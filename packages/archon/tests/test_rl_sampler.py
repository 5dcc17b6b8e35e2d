"""Embedded sampler: greedy equals HF generate, behaviour logprobs equal forward_batch, stop tokens,
top-k / top-p support, and no side effects on the trained model or the global RNG."""

import archon
import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.rl import EmbeddedSampler
from archon.testing import hf_greedy, hf_model, tiny_hf_config
from archon_rl import SamplingConfig, sample_tokens

PROMPTS = [[5, 17, 3], [9], [40, 41, 42, 43, 44, 45, 46], [7, 7, 7, 7]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    ref = hf_model(tiny_hf_config("qwen3", vocab_size=50), seed=3)
    ref.save_pretrained(d)
    return d, ref


def test_greedy_equals_hf_generate_and_stop_tokens(hf_dir):
    d, ref = hf_dir
    model = archon.from_pretrained(d)
    n = 8
    want = [hf_greedy(ref, p, n) for p in PROMPTS]
    got = EmbeddedSampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0)).generate(PROMPTS)
    assert got.responses() == want
    assert got.lengths_B.tolist() == [n] * len(PROMPTS) and not got.stopped_B.any()

    stop = want[0][2]  # a token greedy decoding emits: rows containing it must end right after it
    got = EmbeddedSampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=[stop])
                          ).generate(PROMPTS)
    cut = [w[: w.index(stop) + 1] if stop in w else w for w in want]
    assert got.responses() == cut
    assert got.stopped_B.tolist() == [stop in w for w in want]
    assert (got.tokens_BL[0, len(cut[0]):] == 0).all() and (got.logprobs_BL[0, len(cut[0]):] == 0).all()


def _sampler_vs_forward_batch(eng, gen, prompts):
    """The sampler's behaviour logprobs and the engine's forward_batch logprobs of the same sequences,
    token-aligned, with the response-token mask."""
    seqs = [p + r for p, r in zip(prompts, gen.responses())]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, gen.responses())]
    batch = PackedBatch.from_sequences(seqs, masks)
    ref_T = eng.forward_batch(batch)["logprobs"]
    got_T = torch.cat([torch.cat([torch.zeros(len(p)), torch.tensor(lp)])
                       for p, lp in zip(prompts, gen.response_logprobs())])
    return got_T, ref_T, batch.loss_mask.bool()


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_behaviour_logprobs_equal_forward_batch(hf_dir, sampling):
    d, _ = hf_dir
    eng = ArchonEngine(ActorConfig(path=str(d), dtype="float32"), device="cpu").initialize()
    cfg = SamplingConfig(max_new_tokens=10, stop_token_ids=[1, 2], **sampling)
    gen = EmbeddedSampler(eng.model, cfg, seed=5).generate(PROMPTS * 2, step=1)
    got_T, ref_T, mask_T = _sampler_vs_forward_batch(eng, gen, PROMPTS * 2)
    assert mask_T.sum() > 20
    torch.testing.assert_close(got_T[mask_T], ref_T[mask_T], atol=1e-5, rtol=0)


def test_sampler_leaves_model_and_rng_alone(hf_dir):
    d, _ = hf_dir
    model = archon.from_pretrained(d).train()
    sampler = EmbeddedSampler(model, SamplingConfig(max_new_tokens=6), seed=1)
    rng = torch.get_rng_state()
    a, b = sampler.generate(PROMPTS, step=3), sampler.generate(PROMPTS, step=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(a.tokens_BL, b.tokens_BL)
    c = sampler.generate(PROMPTS * 4, step=4)
    assert not torch.equal(c.tokens_BL[: len(PROMPTS)], a.tokens_BL)


def test_top_k_top_p_restrict_the_support():
    logits_BV = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits_BV, SamplingConfig(top_k=2), g)
    assert set(tok.tolist()) == {0, 1}
    p = torch.tensor([2.0, 1.0]).softmax(0)
    assert abs((tok == 0).float().mean() - p[0]) < 0.03
    torch.testing.assert_close(lp, logits_BV.log_softmax(-1).gather(1, tok[:, None]).squeeze(1))
    # probabilities 0.563, 0.207, 0.126, 0.028, 0.076: the top two sum to 0.77
    tok, _ = sample_tokens(logits_BV, SamplingConfig(top_p=0.8), g)
    assert set(tok.tolist()) == {0, 1, 2}
    tok, _ = sample_tokens(logits_BV, SamplingConfig(top_p=0.75), g)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample_tokens(logits_BV, SamplingConfig(top_p=0.1), g)
    assert set(tok.tolist()) == {0}
    tok, _ = sample_tokens(logits_BV, SamplingConfig(temperature=0.0), g)
    assert set(tok.tolist()) == {0}


def test_bad_sampling_config():
    for kw, msg in [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                    (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=msg):
            SamplingConfig(**kw).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_cuda_sampler_logprobs_match_forward_batch(hf_dir, dtype, atol):
    """On CUDA the engine's blocks are compiled (forward_batch) while the sampler runs them eagerly with a
    KV cache, so kernels differ: fp32 agrees to 1e-4 (TF32 off by default), bf16 only to bf16 precision."""
    d, _ = hf_dir
    eng = ArchonEngine(ActorConfig(path=str(d), dtype=dtype), device="cuda").initialize()
    sampler = EmbeddedSampler(eng.model, SamplingConfig(max_new_tokens=12), seed=2, autocast=eng._autocast)
    gen = sampler.generate(PROMPTS * 8, step=0)
    assert gen.tokens_BL.device.type == "cuda"
    got_T, ref_T, mask_T = _sampler_vs_forward_batch(eng, gen, PROMPTS * 8)
    assert (got_T[mask_T] - ref_T[mask_T]).abs().max() <= atol
