"""pad_to_maximum: padding to the token budget changes no logprob, loss or grad; compiled blocks compile once
with padding (dynamic=False) and at most twice without it (dynamic=None); unsupported layouts are rejected."""

import dataclasses

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.config.validate import validate_pad_to_maximum
from archon.engine.batch import PackedBatch
from archon.engine.build import block_compile_config
from archon.engine.engine import ArchonEngine
from archon.engine.runner import OVERSIZE_BUCKET, padded_length
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens
from archon_parallel.compile import CompileConfig
from archon_parallel.dims import ParallelDims

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=50)).save_pretrained(d)
    return str(d)


def _engine(model_dir, pad, mb_max_tokens=45, attn_impl="auto"):
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=mb_max_tokens)
    actor.archon.pad_to_maximum = pad
    actor.archon.attn_impl = attn_impl
    return ArchonEngine(actor, device="cpu").initialize()


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 50, (L,), generator=g).tolist() for L in lengths]
    masks = [(torch.rand(L, generator=g) > 0.3).float().tolist() for L in lengths]
    return PackedBatch.from_sequences(seqs, masks)


def _token_counts(engine):
    seen = []
    engine.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    return seen


def test_padding_changes_no_logprob_loss_or_grad(model_dir):
    batch = _batch([30, 12, 7, 40, 25, 3, 45, 18])
    long_mb = _batch([60, 7], seed=1)  # over the 45-token budget (the planner never builds one): padded to 1024
    results = {}
    for pad in (False, True):
        eng = _engine(model_dir, pad)
        assert (eng.runner.pad_to_tokens == eng.cfg.mb_max_tokens) == pad
        seen = _token_counts(eng)
        out = eng.forward_batch(batch, want_entropy=True)
        with torch.no_grad():
            out_long = eng.runner.forward(long_mb, want_entropy=True)
        eng.optimizer.zero_grad(set_to_none=True)
        stats = eng.accumulate_grads(batch, sft_loss, target_tokens)
        grads = {n: p.grad.clone() for n, p in eng.model.named_parameters()}
        results[pad] = out, out_long, stats["loss"], grads, seen
    (out0, long0, loss0, g0, seen0), (out1, long1, loss1, g1, seen1) = results[False], results[True]
    assert set(seen1) == {45, OVERSIZE_BUCKET} and len(set(seen0)) > 2  # padding did happen
    for k in ("logprobs", "entropy"):
        assert (out0[k] - out1[k]).abs().max() <= 1e-6, k
        assert long1[k].shape == (67,) and (long0[k] - long1[k]).abs().max() <= 1e-6, k
    assert abs(loss0 - loss1) <= 1e-6 * abs(loss0)
    for n in g0:
        rel = (g0[n] - g1[n]).norm() / g0[n].norm().clamp(min=1e-30)
        assert rel <= 1e-6, f"{n}: rel diff {rel:.2e}"


def test_padded_length():
    assert padded_length(13, 4) == 16 and padded_length(16, 4) == 16
    assert padded_length(13, 1, 45) == 45 and padded_length(13, 4, 45) == 48 and padded_length(48, 4, 45) == 48
    assert padded_length(49, 4, 45) == OVERSIZE_BUCKET and padded_length(1500, 3, 45) == 3072


@pytest.mark.parametrize("scope", ["block", "stack"])
@pytest.mark.parametrize("pad", [True, False])
def test_compiled_blocks_recompile_at_most_once(model_dir, pad, scope):
    """4 micro-batches, each with a different token and document count, through compiled blocks or the compiled
    layer stack ('aot_eager' on CPU, dynamic as the engine picks it): one graph with padding, at most two
    without."""
    from archon.spec import get_model_spec
    from archon_parallel.compile import apply_compile
    from torch._dynamo.utils import counters

    eng = _engine(model_dir, pad, mb_max_tokens=96, attn_impl="varlen")  # varlen: the dense-mask path on CPU
    compile_cfg = block_compile_config(eng.cfg, eng.dims, CPU)
    assert compile_cfg.dynamic is (False if pad else None)
    plan = get_model_spec(eng.model.args.model_type).parallel_plan(eng.model.args)
    torch._dynamo.reset()
    counters.clear()
    apply_compile(eng.model, plan, dataclasses.replace(compile_cfg, enabled=True, backend="aot_eager", scope=scope))
    for i, lengths in enumerate([[30, 20], [44], [10, 20, 30, 9], [70, 5, 11]]):
        mb = _batch(lengths, seed=i)
        eng.runner.forward_backward(mb, sft_loss, scale=1.0, aux_scale=0.0)
    graphs = counters["stats"]["unique_graphs"]
    assert (graphs == 1) if pad else (1 <= graphs <= 2), graphs
    torch._dynamo.reset()


def test_pad_to_maximum_resolution_and_rules(model_dir, tmp_path):
    actor = ActorConfig(path=model_dir)
    d1 = ParallelDims.from_allocation("archon:d1", 1)
    assert block_compile_config(actor, d1, CPU) == CompileConfig(enabled=False, dynamic=None)  # default: off
    actor.archon.enable_compile = True
    # compile alone does not pad: automatic dynamic shapes
    assert block_compile_config(actor, d1, CPU) == CompileConfig(enabled=True, dynamic=None)
    actor.archon.pad_to_maximum = True
    assert block_compile_config(actor, d1, CPU) == CompileConfig(enabled=True, dynamic=False)
    for alloc, world, rule in (("archon:c2", 2, "pad-to-maximum-with-cp"), ("archon:p2", 2, "pad-to-maximum-with-pp")):
        with pytest.raises(ValueError, match=rule):
            validate_pad_to_maximum(actor, ParallelDims.from_allocation(alloc, world))
    for mode in ("sparse", "dta"):
        actor.archon.tree_training_mode = mode
        with pytest.raises(ValueError, match="pad-to-maximum-with-tree"):
            validate_pad_to_maximum(actor, d1)
    actor.archon.tree_training_mode = "disabled"
    validate_pad_to_maximum(actor, d1)
    tiny_hf_config("qwen3_moe").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pad-to-maximum-moe"):
        validate_pad_to_maximum(ActorConfig(path=str(tmp_path), archon=actor.archon), d1)
