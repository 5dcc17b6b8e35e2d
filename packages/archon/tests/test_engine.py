"""Engine: micro-batching equals one big batch; non-finite grads skip the step; logprobs equal HF."""

import math

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.engine.optim import lr_lambda
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens


def _engine(tmp_path, mb_max_tokens=4096, device="cpu", **kw):
    cfg = tiny_hf_config("qwen3", vocab_size=50)
    hf_model(cfg).save_pretrained(tmp_path / "m")
    actor = ActorConfig(path=str(tmp_path / "m"), dtype="float32", mb_max_tokens=mb_max_tokens, **kw)
    actor.optimizer.lr = 1e-2
    actor.archon.enable_compile = False
    return ArchonEngine(actor, device=device).initialize()


def _batch(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (n,), generator=g).tolist()
    seqs = [torch.randint(0, 50, (L,), generator=g).tolist() for L in lengths]
    masks = [(torch.rand(L, generator=g) > 0.3).float().tolist() for L in lengths]
    return PackedBatch.from_sequences(seqs, masks)


def _grads(engine, batch):
    engine.optimizer.zero_grad(set_to_none=True)
    engine.accumulate_grads(batch, sft_loss, target_tokens)
    return {n: p.grad.clone() for n, p in engine.model.named_parameters()}


def test_micro_batching_equals_one_big_batch(tmp_path):
    batch = _batch()
    big = _grads(_engine(tmp_path / "a", mb_max_tokens=10_000), batch)
    eng = _engine(tmp_path / "b", mb_max_tokens=45)
    assert len(eng._micro_batches(batch)) >= 3
    small = _grads(eng, batch)
    for n in big:
        rel = (big[n] - small[n]).norm() / big[n].norm().clamp(min=1e-30)
        assert rel <= 1e-6, f"{n}: rel diff {rel:.2e}"


def test_forward_batch_logprobs_equal_hf(tmp_path):
    cfg = tiny_hf_config("qwen3", vocab_size=50)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path / "m")
    actor = ActorConfig(path=str(tmp_path / "m"), dtype="float32", mb_max_tokens=50)
    actor.archon.logprob_chunk_size = 7  # several chunks per micro-batch
    eng = ArchonEngine(actor, device="cpu").initialize()
    batch = _batch(1)
    out = eng.forward_batch(batch, want_entropy=True)
    cu = batch.cu_seqlens.tolist()
    for i in range(batch.num_seqs):
        ids = batch.input_ids[cu[i]:cu[i + 1]]
        with torch.no_grad():
            logits = ref(input_ids=ids[None]).logits[0].float()
        logp = logits.log_softmax(-1)
        want_lp = torch.cat([torch.zeros(1), logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)])
        want_ent = torch.cat([torch.zeros(1), -(logp.exp() * logp).sum(-1)[:-1]])
        assert torch.allclose(out["logprobs"][cu[i]:cu[i + 1]], want_lp, atol=1e-5), i
        assert torch.allclose(out["entropy"][cu[i]:cu[i + 1]], want_ent, atol=1e-5), i


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_non_finite_grad_skips_the_step(tmp_path, device):
    """CPU checks the norm on the host; CUDA's fused AdamW skips on the device (found_inf) without a host read
    before the step: either way the parameters, the optimizer state and the version stay as they were."""
    from archon.engine.engine import _skips_on_device

    eng = _engine(tmp_path, device=device)
    assert _skips_on_device(eng.optimizer) == (device == "cuda")
    eng.train_batch(_batch(1), sft_loss, target_tokens)  # a real step first: the optimizer has state
    state = {p: {k: v.clone() for k, v in st.items()} for p, st in eng.optimizer.state.items()}
    before = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    eng.version = 0

    def nan_loss(out, mb):
        return out["logprobs"].sum() * float("nan")

    stats = eng.train_batch(_batch(), nan_loss, target_tokens)
    assert stats["update_skipped"] == 1.0 and not math.isfinite(stats["grad_norm"])
    for n, p in eng.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert eng.version == 0
    for p, st in eng.optimizer.state.items():  # moments and step count untouched: the skipped step is not counted
        assert float(st["step"]) == 1.0 and all(torch.equal(v, state[p][k]) for k, v in st.items())
    stats = eng.train_batch(_batch(), sft_loss, target_tokens)
    assert stats["update_skipped"] == 0.0 and eng.version == 1
    assert all(float(st["step"]) == 2.0 for st in eng.optimizer.state.values())


def test_grad_clipping_bounds_the_update(tmp_path):
    eng = _engine(tmp_path)
    eng.cfg.optimizer.gradient_clipping = 1e-3
    eng.optimizer.zero_grad()
    eng.accumulate_grads(_batch(), sft_loss, target_tokens)
    norm = eng._clip_grad_norm()
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in eng.model.parameters()))
    assert norm > 1e-3 and after == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedules(kind):
    f = lr_lambda(kind, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    end = {"constant": 1.0, "linear": 0.1, "cosine": 0.1}[kind]
    assert f(10) == pytest.approx(end)
    if kind == "cosine":
        assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_train_batch_before_initialize_says_so(tmp_path):
    cfg = tiny_hf_config("qwen3", vocab_size=50)
    hf_model(cfg).save_pretrained(tmp_path / "m")
    actor = ActorConfig(path=str(tmp_path / "m"), dtype="float32")
    actor.archon.enable_compile = False
    engine = ArchonEngine(actor, device="cpu")
    with pytest.raises(RuntimeError, match=r"before initialize\(\)"):
        engine.train_batch(_batch(), sft_loss, target_tokens)


def test_bad_batches():
    with pytest.raises(ValueError, match="empty batch"):
        PackedBatch.from_sequences([])
    with pytest.raises(ValueError, match="cu_seqlens"):
        PackedBatch(torch.arange(5), torch.tensor([0, 3], dtype=torch.int32), torch.ones(5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_clipping_equals_clip_then_step_cuda(tmp_path, monkeypatch):
    """The fused path (clipping as AdamW's grad_scale) trains like clip-in-place then AdamW, with the clip active
    (max norm far below the grad norm) and inactive."""
    import archon.engine.engine as engine_mod

    for max_norm in (1e-3, 1e3):
        results = []
        for fused in (True, False):
            monkeypatch.setattr(engine_mod, "_skips_on_device", lambda opt, fused=fused: fused)
            eng = _engine(tmp_path / f"{max_norm}{fused}", device="cuda")
            eng.cfg.optimizer.gradient_clipping = max_norm
            norms = [eng.train_batch(_batch(i), sft_loss, target_tokens)["grad_norm"] for i in range(3)]
            results.append((norms, {n: p.detach().clone() for n, p in eng.model.named_parameters()}))
        (n_f, p_f), (n_h, p_h) = results
        assert n_f == pytest.approx(n_h, rel=1e-5) and (max_norm < n_h[0]) == (max_norm == 1e-3)
        for n in p_f:
            torch.testing.assert_close(p_f[n], p_h[n], rtol=1e-5, atol=1e-6, msg=n)


def test_batch_to_moves_without_revalidating(monkeypatch):
    """`PackedBatch.to` copies every field and does not validate again: validation reads cu_seqlens on the host,
    which for a device batch in the middle of a step would wait for the GPU (checked here by making
    validation raise after the batch was built)."""
    batch = _batch(2)
    batch.token_extras["adv"] = torch.randn(batch.num_tokens)
    batch.seq_extras["reward"] = torch.randn(batch.num_seqs)
    monkeypatch.setattr(PackedBatch, "validate", lambda self: (_ for _ in ()).throw(AssertionError("validated")))
    moved = batch.to("cpu")
    for name in ("input_ids", "cu_seqlens", "loss_mask"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    assert torch.equal(moved.token_extras["adv"], batch.token_extras["adv"])
    assert torch.equal(moved.seq_extras["reward"], batch.seq_extras["reward"])
    assert moved.token_extras is not batch.token_extras  # a new batch, not an alias of the caller's dicts
