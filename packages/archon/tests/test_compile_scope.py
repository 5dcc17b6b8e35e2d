"""Compile scopes: the layer stack compiled as one graph trains exactly like the eager model (CPU, aot_eager;
CUDA, inductor), and `compile_scope` resolves / rejects by the documented rules."""

import dataclasses

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.config.validate import compile_scope
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.spec import get_model_spec
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens
from archon_parallel.compile import CompileConfig, apply_compile
from archon_parallel.dims import ParallelDims
from archon_parallel.parallelize import parallelize

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=64)).save_pretrained(d)
    return str(d)


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedBatch.from_sequences([torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths])


def _train(model_dir, device, *, scope=None, dtype="float32", steps=3, enable_compile=False):
    """Losses of `steps` train_batch calls and the final parameters. scope=None: eager; else the engine's model
    compiled at that scope ('aot_eager' on CPU, the engine's own inductor compile on CUDA)."""
    actor = ActorConfig(path=model_dir, dtype=dtype, mb_max_tokens=48, seed=3)
    actor.optimizer.lr = 1e-3
    actor.archon.attn_impl = "varlen"
    if device.type == "cuda":
        actor.archon.enable_compile = scope is not None
        actor.archon.compile_scope = scope or "block"
    eng = ArchonEngine(actor, device=device.type, total_steps=steps).initialize()
    if device.type == "cpu" and scope is not None:
        plan = get_model_spec(eng.model.args.model_type).parallel_plan(eng.model.args)
        apply_compile(eng.model, plan, CompileConfig(enabled=True, backend="aot_eager", scope=scope))
    losses = []
    for i in range(steps):  # every step has its own token and document counts (automatic dynamic shapes)
        stats = eng.train_batch(_batch([[30, 12, 7, 40], [44, 3], [9, 21, 17, 25, 2]][i % 3], seed=i), sft_loss,
                                target_tokens)
        losses.append(stats["loss"])
    logprobs = eng.forward_batch(_batch([20, 33, 5], seed=9))["logprobs"]
    params = {n: p.detach().float().cpu().clone() for n, p in eng.model.named_parameters()}
    return losses, logprobs.float().cpu(), params, eng


@pytest.mark.parametrize("scope", ["block", "stack"])
def test_compiled_scope_trains_like_eager_cpu(model_dir, scope):
    torch._dynamo.reset()
    ref_losses, ref_lp, ref_params, _ = _train(model_dir, CPU)
    losses, lp, params, eng = _train(model_dir, CPU, scope=scope)
    compiled_stack = isinstance(eng.model.__dict__.get("run_layers"), type(torch.compile(lambda x: x)))
    assert compiled_stack == (scope == "stack")
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-6 * abs(b), (losses, ref_losses)
    assert (lp - ref_lp).abs().max() <= 1e-5
    for n, p in ref_params.items():
        assert torch.allclose(params[n], p, rtol=1e-5, atol=1e-6), n
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_stack_trains_like_eager_cuda(model_dir):
    """Inductor on CUDA, fp32 (no TF32): the stack graph, the per-block graphs and eager agree to fp32 noise;
    bf16 runs too and stays within bf16 noise of eager."""
    torch._dynamo.reset()
    ref = _train(model_dir, CUDA)
    for scope in ("stack", "block"):
        losses, lp, params, _ = _train(model_dir, CUDA, scope=scope)
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref[0])) <= 1e-4, (scope, losses, ref[0])
        assert (lp - ref[1]).abs().max() <= 1e-3, scope
        worst = max(((params[n] - p).norm() / p.norm()).item() for n, p in ref[2].items())
        assert worst <= 1e-4, (scope, worst)
    ref16 = _train(model_dir, CUDA, dtype="bfloat16")
    stack16 = _train(model_dir, CUDA, dtype="bfloat16", scope="stack")
    assert max(abs(a - b) / abs(b) for a, b in zip(stack16[0], ref16[0])) <= 2e-2, (stack16[0], ref16[0])
    torch._dynamo.reset()


def test_compile_scope_rules(model_dir):
    actor = ActorConfig(path=model_dir)
    d1, d2 = ParallelDims.from_allocation("archon:d1", 1), ParallelDims.from_allocation("archon:d2", 2)
    actor.archon.enable_compile = True
    assert compile_scope(actor, d1, CPU) == compile_scope(actor, d2, CPU) == "block"  # the default
    actor.archon.compile_scope = "stack"
    assert compile_scope(actor, d1, CPU) == "stack"
    with pytest.raises(ValueError, match="compile-stack-with-fsdp"):
        compile_scope(actor, d2, CPU)  # FSDP2 shards over d2
    actor.archon.dp_layout = "zero1"
    assert compile_scope(actor, d2, CPU) == "stack"  # full replicas: nothing splits the stack
    actor.archon.tree_training_mode = "dta"
    with pytest.raises(ValueError, match="compile-stack-with-dta"):
        compile_scope(actor, d1, CPU)
    actor.archon.tree_training_mode = "sparse"
    assert compile_scope(actor, d1, CPU) == "stack"
    actor.archon.compile_scope = "auto"
    with pytest.raises(ValueError, match="compile_scope"):
        compile_scope(actor, d1, CPU)


def test_parallelize_rejects_stack_over_fsdp():
    from archon.hf import build_model

    model = build_model(tiny_hf_config("qwen3"), device="meta")
    plan = get_model_spec("qwen3").parallel_plan(model.args)
    cfg = dataclasses.replace(CompileConfig(enabled=True), scope="stack")
    with pytest.raises(ValueError, match="compile scope 'stack'"):
        parallelize(model, ParallelDims.from_allocation("archon:d2", 2), plan, compile=cfg)
    bad = dataclasses.replace(cfg, scope="model")
    with pytest.raises(ValueError, match="compile scope must be one of"):
        apply_compile(model, plan, bad)


def test_compile_mode_rules(model_dir):
    from archon.config.validate import validate_compile_mode

    actor = ActorConfig(path=model_dir)
    d1, d2 = ParallelDims.from_allocation("archon:d1", 1), ParallelDims.from_allocation("archon:d2", 2)
    actor.archon.compile_mode = "reduce-overhead"
    validate_compile_mode(actor, d1, CUDA)
    with pytest.raises(ValueError, match="compile-mode-cuda-graphs-needs-cuda"):
        validate_compile_mode(actor, d1, CPU)
    with pytest.raises(ValueError, match="compile-mode-cuda-graphs-layout"):
        validate_compile_mode(actor, d2, CUDA)
    actor.archon.dp_layout = "zero1"
    validate_compile_mode(actor, d2, CUDA)
    actor.archon.tree_training_mode = "sparse"
    with pytest.raises(ValueError, match="compile-mode-cuda-graphs-tree"):
        validate_compile_mode(actor, d1, CUDA)
    actor.archon.compile_mode = "fast"
    with pytest.raises(ValueError, match="compile_mode"):
        validate_compile_mode(actor, d1, CUDA)


def test_compile_cpp_wrapper_rules_and_kwargs(model_dir):
    """compile_cpp_wrapper is an inductor option merged into the mode's options (torch.compile takes a mode or
    options, not both), and an error where nothing compiles."""
    from archon.config.validate import validate_compile_mode
    from archon_parallel.compile import compile_kwargs

    actor = ActorConfig(path=model_dir)
    d1 = ParallelDims.from_allocation("archon:d1", 1)
    actor.archon.compile_cpp_wrapper = True
    with pytest.raises(ValueError, match="compile-cpp-wrapper-needs-compile"):
        validate_compile_mode(actor, d1, CPU)  # compile is off on CPU unless enabled
    actor.archon.enable_compile = True
    validate_compile_mode(actor, d1, CPU)
    with pytest.raises(ValueError, match="compile-cpp-wrapper-cuda"):
        validate_compile_mode(actor, d1, CUDA)  # inductor fails on CUDA for packed batches
    plain = compile_kwargs(CompileConfig(enabled=True, mode="reduce-overhead"))
    assert plain["mode"] == "reduce-overhead" and "options" not in plain
    kw = compile_kwargs(CompileConfig(enabled=True, mode="reduce-overhead", cpp_wrapper=True))
    assert "mode" not in kw and kw["options"] == {"triton.cudagraphs": True, "cpp_wrapper": True}
    assert compile_kwargs(CompileConfig(enabled=True, cpp_wrapper=True))["options"] == {"cpp_wrapper": True}
    with pytest.raises(ValueError, match="inductor option"):
        compile_kwargs(CompileConfig(enabled=True, backend="aot_eager", cpp_wrapper=True))


def test_cpp_wrapper_compiled_blocks_train_like_eager_cpu(model_dir):
    """The engine's own compile with compile_cpp_wrapper (inductor with its C++ wrapper, on CPU): loss and every
    gradient equal the eager engine's (fp32; inductor's fused kernels may round differently, so relative 1e-5)."""
    def grads(cpp_wrapper: bool):
        torch._dynamo.reset()
        actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=48, seed=3)
        actor.archon.attn_impl = "varlen"
        actor.archon.enable_compile = cpp_wrapper
        actor.archon.compile_cpp_wrapper = cpp_wrapper
        eng = ArchonEngine(actor, device="cpu").initialize()
        loss = eng.accumulate_grads(_batch([30, 12, 7, 40]), sft_loss, target_tokens)["loss"]
        return loss, {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in eng.model.named_parameters()}

    want_loss, want = grads(False)
    loss, got = grads(True)
    torch._dynamo.reset()
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    for n, g in want.items():
        rel = float((got[n] - g).norm() / g.norm().clamp(min=1e-12))
        assert rel <= 1e-5, f"{n}: relative diff {rel:.2e}"
