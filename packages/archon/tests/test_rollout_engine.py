"""The rollout engine on archon models: greedy equals HF generate and the embedded sampler, seeded tokens do not
depend on batching (batch size, bucket, slot order, arrival order, cache budget), logprobs equal forward_batch,
shared prompt prefixes prefill once; on CUDA, captured graphs equal eager steps and see in-place weight updates."""

import importlib.util
import os
import subprocess
import sys

import archon
import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.rl import EmbeddedSampler, RolloutSampler, build_rollout_engine
from archon.testing import hf_greedy, hf_model, tiny_hf_config
from archon_rl import GenRequest, SamplingConfig, sequence_seeds, triton_runs_here

TRITON_HERE = triton_runs_here()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def needs_triton(kernels: str) -> None:
    if kernels == "triton" and not TRITON_HERE:
        pytest.skip("Triton on CPU runs interpreted in a fresh process: test_triton_cases_interpreted")


PROMPTS = [[5, 17, 3], [9], [40, 41, 42, 43, 44, 45, 46], [7, 7, 7, 7], [11, 12], [30, 2, 30, 2, 30]]
# bytes of one cached position of the tiny models: K and V, 2 layers, 2 kv heads, head dim 24, fp32
TOKEN_BYTES = 2 * 2 * 2 * 24 * 4


def budget(slots: int, slot_len: int = 24) -> dict:
    """Engine options for a cache of exactly ``slots`` slots of ``slot_len`` positions."""
    return dict(kv_cache_gb=slots * slot_len * TOKEN_BYTES / 2**30, max_seq_len=slot_len)


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = hf_model(tiny_hf_config(request.param, vocab_size=50), seed=3)
    ref.save_pretrained(d)
    return d, ref


def test_greedy_equals_hf_generate_and_embedded_sampler(hf_dir):
    d, ref = hf_dir
    model = archon.from_pretrained(d)
    n = 8
    want = [hf_greedy(ref, p, n) for p in PROMPTS]
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.0)
    assert EmbeddedSampler(model, cfg).generate(PROMPTS).responses() == want
    sampler = RolloutSampler(model, cfg, **budget(2))  # 2 slots for 6 prompts: the others wait
    assert sampler.generate(PROMPTS).responses() == want
    assert sampler.engine.num_slots == 2

    stop = want[0][2]  # rows emitting it end right after it; freed slots take waiting prompts
    got = RolloutSampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=[stop]),
                         **budget(3)).generate(PROMPTS)
    cut = [w[: w.index(stop) + 1] if stop in w else w for w in want]
    assert got.responses() == cut
    assert got.stopped_B.tolist() == [stop in w for w in want]


MIXED = [SamplingConfig(max_new_tokens=9, temperature=1.0, stop_token_ids=[1, 2]),
         SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9),
         SamplingConfig(max_new_tokens=5, temperature=0.0),
         SamplingConfig(max_new_tokens=11, temperature=1.3, top_p=0.8, stop_token_ids=[4])]


def _requests():
    seeds = sequence_seeds(7, 3, range(12)).tolist()
    return [GenRequest(PROMPTS[i % len(PROMPTS)], MIXED[i % len(MIXED)], seed=s) for i, s in enumerate(seeds)]


def _outputs(engine, reqs):
    return [(r.output_ids, r.finish_reason) for r in engine.generate(reqs)], engine


def test_seeded_tokens_do_not_depend_on_batching(hf_dir):
    """Mixed sampling settings in one batch; the same requests in other batch sizes, buckets, slot counts and
    arrival orders give the same tokens, and each equals the embedded sampler's for the same seed."""
    d, _ = hf_dir
    model = archon.from_pretrained(d)
    reqs = _requests()
    base, eng = _outputs(build_rollout_engine(model, **budget(12)), reqs)
    assert eng.stats["decode_row_steps"] < 12 * 12  # rows that finished early left the batch
    for opts in [budget(1), budget(3), dict(**budget(5), buckets=[8]), dict(**budget(12), buckets=[4, 12])]:
        assert _outputs(build_rollout_engine(model, **opts), reqs)[0] == base, opts
    order = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]
    shuffled, _ = _outputs(build_rollout_engine(model, **budget(4)), [reqs[i] for i in order])
    assert shuffled == [base[i] for i in order]
    alone = [_outputs(build_rollout_engine(model, **budget(1)), [r])[0][0] for r in reqs[:4]]
    assert alone == base[:4]
    for i, r in enumerate(reqs[:4]):  # today's sampler, one row, same seed
        ref = EmbeddedSampler(model, r.sampling, seed=7).generate([r.input_ids], step=3, indices=[i])
        assert ref.responses()[0] == base[i][0]
    assert len({tuple(t) for t, _ in base}) > 6 and {f for _, f in base} == {"stop", "length"}


def test_logprobs_equal_forward_batch(hf_dir):
    d, _ = hf_dir
    eng = ArchonEngine(ActorConfig(path=str(d), dtype="float32"), device="cpu").initialize()
    reqs = _requests()
    out = build_rollout_engine(eng.model, **budget(4)).generate(reqs)
    seqs = [r.input_ids + o.output_ids for r, o in zip(reqs, out)]
    masks = [[0] * len(r.input_ids) + [1] * len(o.output_ids) for r, o in zip(reqs, out)]
    ref_T = eng.forward_batch(PackedBatch.from_sequences(seqs, masks))["logprobs"]
    got_T = torch.cat([torch.tensor([0.0] * len(r.input_ids) + o.logprobs) for r, o in zip(reqs, out)])
    mask_T = torch.tensor(sum(masks, [])).bool()
    assert mask_T.sum() > 50
    torch.testing.assert_close(got_T[mask_T], ref_T[mask_T], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_decode_step_equals_hf_and_the_model_forward(hf_dir, kernels):
    """The fused step (fused ops driving the model's modules block by block; Triton interpreted on CPU) gives HF's
    greedy tokens, and for mixed seeded requests the tokens and logprobs (1e-5) of the model's own forward."""
    needs_triton(kernels)
    d, ref = hf_dir
    model = archon.from_pretrained(d)
    n = 5
    greedy = RolloutSampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0), kernels=kernels, **budget(3))
    assert greedy.engine.step_fn.fused and greedy.engine.kernels is not None
    assert greedy.generate(PROMPTS).responses() == [hf_greedy(ref, p, n) for p in PROMPTS]
    reqs = _requests()[:6]
    want = build_rollout_engine(model, kernels="none", **budget(4)).generate(reqs)  # the model's forward
    got = build_rollout_engine(model, kernels=kernels, **budget(4)).generate(reqs)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)


def test_fused_step_low_precision_weights_equal_autocast(hf_dir):
    """fp32 parameters decoded under bf16 autocast: the fused step reads bf16 weight copies made once per generate
    call and gives the tokens and logprobs of the model's forward under autocast; in-place updates reach them."""
    d, _ = hf_dir
    if "moe" in d.name:
        pytest.skip("dense blocks: the MoE experts are called as they are")
    model = archon.from_pretrained(d)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    reqs = _requests()[:6]
    fused = build_rollout_engine(model, autocast=autocast, kernels="torch", **budget(4))
    assert fused.step_fn.weights is not None and fused.step_fn.weights.nbytes() > 0
    for _ in range(2):
        want = build_rollout_engine(model, autocast=autocast, kernels="none", **budget(4)).generate(reqs)
        got = fused.generate(reqs)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.25)


def test_released_memory_is_allocated_again(hf_dir):
    d, _ = hf_dir
    model = archon.from_pretrained(d)
    reqs = _requests()[:6]
    want = build_rollout_engine(model, **budget(4)).generate(reqs)
    eng = build_rollout_engine(model, release_memory=True, **budget(4))
    for _ in range(2):
        assert [r.output_ids for r in eng.generate(reqs)] == [r.output_ids for r in want]
        assert eng.cache is None and eng.state is None and eng.runner is None


def test_shared_prompts_prefill_once(hf_dir):
    d, _ = hf_dir
    model = archon.from_pretrained(d)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
    groups = [p for p in PROMPTS[:3] for _ in range(4)]  # GRPO: 4 samples per prompt
    reqs = [GenRequest(p, cfg, seed=i) for i, p in enumerate(groups)]
    shared, eng = _outputs(build_rollout_engine(model, **budget(12)), reqs)
    assert eng.stats["prefill_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert eng.stats["prompt_tokens"] == sum(len(p) for p in groups)
    alone, eng = _outputs(build_rollout_engine(model, share_prefixes=False, **budget(12)), reqs)
    assert eng.stats["prefill_tokens"] == sum(len(p) for p in groups)
    assert shared == alone and len({tuple(t) for t, _ in shared}) > 6


def test_cascade_prefixes_equal_unshared_decode(hf_dir):
    """Groups sharing a prompt read it from one prefix-store entry (cascade attention merged by log-sum-exp):
    seeded tokens equal the unshared path's, logprobs to 1e-5; an entry is taken again once its rows finish."""
    d, _ = hf_dir
    model = archon.from_pretrained(d)
    reqs = [GenRequest(PROMPTS[2 + i // 5], MIXED[i % len(MIXED)], seed=i) for i in range(18)]  # groups of 5
    want = build_rollout_engine(model, share_prefixes=False, **budget(12)).generate(reqs)
    for opts in [budget(30), dict(**budget(30), kv_block=4), budget(6)]:
        eng = build_rollout_engine(model, cascade=True, **opts)
        got = eng.generate(reqs)
        assert [r.output_ids for r in got] == [r.output_ids for r in want], opts
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        assert eng.stats["cascade_rows"] > 0 and eng.stats["cascade_steps"] > 0, eng.stats
    assert eng.stats["cascade_rows"] > 2 * eng.cache.prefix.entries  # budget(6): 4 slots, 1 entry taken again
    with pytest.raises(ValueError, match="cascade needs share_prefixes"):
        build_rollout_engine(model, cascade=True, share_prefixes=False)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_cascade_equals_unshared_decode(hf_dir, kernels):
    """Cascade attention by the fused ops (Triton interpreted on CPU: a prefix kernel per entry and the row kernel
    merging it) gives the unshared path's seeded tokens and logprobs (1e-5)."""
    needs_triton(kernels)
    d, _ = hf_dir
    model = archon.from_pretrained(d)
    reqs = [GenRequest(PROMPTS[2 + i // 3], MIXED[i % len(MIXED)], seed=i) for i in range(7)]  # groups of 3
    want = build_rollout_engine(model, share_prefixes=False, kernels="none", **budget(8)).generate(reqs)
    eng = build_rollout_engine(model, cascade=True, kernels=kernels, **budget(16))
    got = eng.generate(reqs)
    assert eng.stats["cascade_rows"] > 0 and eng.stats["cascade_steps"] > 0, eng.stats
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_TRITON or TRITON_HERE, reason="the Triton cases ran in this process")
@pytest.mark.timeout(420)
def test_triton_cases_interpreted():
    """The fused-kernel cases with Triton, interpreted on CPU in a fresh process (``TRITON_INTERPRET`` must be set
    before the kernels are defined; compiled code of other tests in this process can disturb the interpreter)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                        "triton and not interpreted"], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_compiled_decode_equals_eager_and_follows_weight_updates(hf_dir):
    """The decode forward traced whole by dynamo (fullgraph, static shapes; aot_eager keeps CI cheap, inductor
    on CPU gives the same tokens in ~80 s) equals the eager step, and reads weights updated in place."""
    d, _ = hf_dir
    if "moe" in d.name:
        pytest.skip("the fp32 MoE loops over experts on the host: not one graph")
    model = archon.from_pretrained(d)
    reqs = _requests()[:6]
    compiled = build_rollout_engine(model, compile_decode=True, compile_backend="aot_eager", **budget(4))
    for scale in (1.0, 1.5):
        with torch.no_grad():  # an in-place weight update between calls
            for p in model.parameters():
                p.mul_(scale)
        want = build_rollout_engine(model, **budget(4)).generate(reqs)
        got = compiled.generate(reqs)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
    assert not compiled.runner.compiled.failed
    # a second engine reuses dynamo's graphs for the same shapes: they must read its own cache, not the first's
    other = build_rollout_engine(model, compile_decode=True, compile_backend="aot_eager", **budget(4))
    assert [r.output_ids for r in other.generate(reqs)] == [r.output_ids for r in want]
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        build_rollout_engine(model, compile_mode="reduce-overhead")


def test_budget_and_length_errors(hf_dir):
    d, _ = hf_dir
    model = archon.from_pretrained(d)
    req = [GenRequest([1, 2, 3], SamplingConfig(max_new_tokens=4))]
    with pytest.raises(ValueError, match="holds no sequence"):
        build_rollout_engine(model, kv_cache_gb=1e-9, max_seq_len=24).generate(req)
    with pytest.raises(ValueError, match="max_seq_len is 5"):
        build_rollout_engine(model, max_seq_len=5).generate(req)
    with pytest.raises(ValueError, match="empty prompt"):
        build_rollout_engine(model).generate([GenRequest([], SamplingConfig())])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_eager_and_follow_weight_updates(hf_dir):
    """fp32: dense steps are captured; fp32 MoE loops over experts on the host, so it falls back to eager."""
    d, ref = hf_dir
    model = archon.from_pretrained(d, device="cuda")
    moe = "moe" in d.name
    reqs = _requests()
    eager, _ = _outputs(build_rollout_engine(model, cuda_graphs=False, **budget(5)), reqs)
    graphs = build_rollout_engine(model, compile_decode=False, **budget(5))  # compiled: the next test
    if moe:
        with pytest.warns(UserWarning, match="cannot be captured"):
            got, _ = _outputs(graphs, reqs)
    else:
        got, _ = _outputs(graphs, reqs)
    assert got == eager and (len(graphs.runner.graphs) > 0) != moe
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    greedy = [GenRequest(p, cfg) for p in PROMPTS]
    assert [r.output_ids for r in graphs.generate(greedy)] == [hf_greedy(ref, p, 8) for p in PROMPTS]
    with torch.no_grad():  # an in-place weight update: the captured graphs read the new values
        for p in model.parameters():
            p.mul_(1.5)
    ref_eager = [r.output_ids for r in build_rollout_engine(model, cuda_graphs=False).generate(greedy)]
    assert [r.output_ids for r in graphs.generate(greedy)] == ref_eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_decode_graphs_equal_eager_and_follow_weight_updates(hf_dir):
    """fp32, dense: inductor's fused step captured as graphs gives the eager step's greedy tokens and logprobs
    (to fp32 rounding), and in-place weight updates reach the replays (parameters are not frozen)."""
    d, _ = hf_dir
    if "moe" in d.name:
        pytest.skip("the fp32 MoE loops over experts on the host: not one graph")
    model = archon.from_pretrained(d, device="cuda")
    greedy = [GenRequest(p, SamplingConfig(max_new_tokens=8, temperature=0.0)) for p in PROMPTS]
    compiled = build_rollout_engine(model, compile_decode=True, **budget(8))
    for scale in (1.0, 1.5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        want = build_rollout_engine(model, cuda_graphs=False, **budget(8)).generate(greedy)
        got = compiled.generate(greedy)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
    assert compiled.runner.compiled is not None and not compiled.runner.compiled.failed, "compile_decode=True"
    assert len(compiled.runner.graphs) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cascade_graphs_equal_unshared_eager(hf_dir):
    """fp32, dense: cascade attention compiled and captured gives the unshared eager path's greedy tokens."""
    d, _ = hf_dir
    if "moe" in d.name:
        pytest.skip("the fp32 MoE loops over experts on the host: not one graph")
    model = archon.from_pretrained(d, device="cuda")
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    reqs = [GenRequest(PROMPTS[2 + i // 4], cfg) for i in range(12)]  # groups of 4
    want = build_rollout_engine(model, cuda_graphs=False, share_prefixes=False, **budget(12)).generate(reqs)
    eng = build_rollout_engine(model, cascade=True, **budget(30))
    got = eng.generate(reqs)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
    assert eng.stats["cascade_rows"] == 12 and len(eng.runner.graphs) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_logprobs_close_to_forward_batch(hf_dir):
    d, _ = hf_dir
    eng = ArchonEngine(ActorConfig(path=str(d), dtype="bfloat16"), device="cuda").initialize()
    reqs = _requests() * 4
    out = build_rollout_engine(eng.model, autocast=eng._autocast).generate(reqs)
    seqs = [r.input_ids + o.output_ids for r, o in zip(reqs, out)]
    masks = [[0] * len(r.input_ids) + [1] * len(o.output_ids) for r, o in zip(reqs, out)]
    ref_T = eng.forward_batch(PackedBatch.from_sequences(seqs, masks))["logprobs"].float().cpu()
    got_T = torch.cat([torch.tensor([0.0] * len(r.input_ids) + o.logprobs) for r, o in zip(reqs, out)])
    mask_T = torch.tensor(sum(masks, [])).bool()
    assert (got_T[mask_T] - ref_T[mask_T]).abs().max() < 0.1
