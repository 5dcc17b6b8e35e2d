"""Tree modes compose with LoRA and with MoE models: for each, sparse and dta (both of its gradient paths) equal
flat packed training of the same engine config (fp32, CPU): loss and every trainable gradient.

MoE runs with the router's aux loss off: tree modes route each shared token once, so an aux loss over the routed
tokens differs from flat training by design (docs/tree_training.md); the LM loss and its gradients are exact.
"""

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.engine.loss import token_separable
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens
from archon_attn.tree.testing import grpo_batch, multiturn_batch

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _batch() -> PackedBatch:
    g = torch.Generator().manual_seed(11)
    seqs = grpo_batch(g, 2, 3, 5, 4, vocab=VOCAB) + multiturn_batch(g, 1, 3, 3, vocab=VOCAB)
    masks = [(torch.rand(len(s), generator=g) > 0.3).float().tolist() for s in seqs]
    return PackedBatch.from_sequences([s.tolist() for s in seqs], masks)


def _grads(model_dir: str, mode: str, loss_fn, lora: bool, **archon_kw) -> tuple[float, dict[str, torch.Tensor]]:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=4096, seed=3)
    actor.archon.tree_training_mode = mode
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    if lora:
        actor.lora.enabled = True
        actor.lora.r = 4
        actor.lora.alpha = 8.0
    eng = ArchonEngine(actor, device="cpu").initialize()
    if lora:  # B starts at 0: move it so the A factors get a gradient too
        with torch.no_grad():
            for n, p in eng.model.named_parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 1000))
    stats = eng.accumulate_grads(_batch(), loss_fn, target_tokens)
    return stats["loss"], {n.replace("_checkpoint_wrapped_module.", ""): p.grad.detach().clone()
                           for n, p in eng.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compose_dense")
    hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compose_moe")
    cfg = tiny_hf_config("qwen3_moe", vocab_size=VOCAB, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                         router_aux_loss_coef=0.0)
    hf_model(cfg).save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("case", ["lora", "moe"])
def test_tree_modes_compose_with_lora_and_moe(case, request):
    model_dir = request.getfixturevalue("dense_dir" if case == "lora" else "moe_dir")
    lora = case == "lora"
    ref_loss, ref = _grads(model_dir, "disabled", sft_loss, lora)
    if lora:
        assert ref and all(".lora_" in n for n in ref)  # only adapters train
    runs = {"sparse": ("sparse", sft_loss, {}),
            "dta/one_walk": ("dta", sft_loss, dict(tree_dta_block_size=4)),
            "dta/outputs_pass": ("dta", token_separable(sft_loss, False), dict(tree_dta_block_size=0))}
    for name, (mode, loss_fn, kw) in runs.items():
        loss, got = _grads(model_dir, mode, loss_fn, lora, **kw)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (case, name)
        assert got.keys() == ref.keys()
        for n, g in ref.items():
            rel = float((g - got[n]).norm() / g.norm().clamp(min=1e-30))
            assert rel <= 1e-5, f"{case} {name} {n}: relative diff {rel:.2e}"


def test_tree_modes_train_moe_with_aux_loss(tmp_path):
    """With the aux loss on, tree modes differ from flat by design (each shared token is routed once), but must
    train: finite loss and finite, non-zero router gradients in every mode (a smoke test: no reference)."""
    cfg = tiny_hf_config("qwen3_moe", vocab_size=VOCAB, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                         router_aux_loss_coef=0.05)
    hf_model(cfg).save_pretrained(tmp_path)
    for mode, loss_fn in (("sparse", sft_loss), ("dta", sft_loss), ("dta", token_separable(sft_loss, False))):
        loss, grads = _grads(str(tmp_path), mode, loss_fn, False)
        assert torch.isfinite(torch.tensor(loss))
        router = [g for n, g in grads.items() if "router" in n or "gate.weight" in n]
        assert router and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in router), mode


def test_dta_compiled_blocks_equal_flat(dense_dir):
    """dta with compiled blocks (opt-in `enable_compile: true`; 'aot_eager' on CPU): the blocks compile without
    fullgraph and break the graph at DTA's KV hook only; losses and gradients still equal flat training, for both
    gradient paths, and the graphs do not multiply with the number of units or their shapes."""
    import dataclasses

    from archon.engine.build import block_compile_config
    from archon.spec import get_model_spec
    from archon_parallel.compile import apply_compile
    from torch._dynamo.utils import counters

    actor = ActorConfig(path=dense_dir, dtype="float32", mb_max_tokens=4096, seed=3)
    actor.archon.tree_training_mode = "dta"
    actor.archon.tree_dta_block_size = 4
    actor.archon.enable_compile = True
    eng = ArchonEngine(actor, device="cpu").initialize()
    cfg = block_compile_config(eng.cfg, eng.dims, torch.device("cpu"))
    assert cfg.enabled and not cfg.fullgraph
    torch._dynamo.reset()
    counters.clear()
    plan = get_model_spec(eng.model.args.model_type).parallel_plan(eng.model.args)
    apply_compile(eng.model, plan, dataclasses.replace(cfg, backend="aot_eager"))
    assert eng.model.output.compile_backend == cfg.backend  # the engine compiles the LM head's kernels too
    eng.model.output.compile_backend = "aot_eager"
    ref_loss, ref = _grads(dense_dir, "disabled", sft_loss, False)
    for loss_fn in (sft_loss, token_separable(sft_loss, False)):
        eng.optimizer.zero_grad(set_to_none=True)
        loss = eng.accumulate_grads(_batch(), loss_fn, target_tokens)["loss"]
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for n, p in eng.model.named_parameters():
            n = n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
            rel = float((ref[n] - p.grad).norm() / ref[n].norm())
            assert rel <= 1e-5, f"{n}: relative diff {rel:.2e}"
    graphs = counters["stats"]["unique_graphs"]
    # 4 frames (block and attention, each split at the hook) x grad mode x a few shape classes (1 token, dynamic),
    # plus the LM head's two softmax kernels (with and without the entropy term)
    assert 0 < graphs <= 30, graphs
    g = torch.Generator().manual_seed(99)  # new unit shapes and counts: no new graphs
    more = PackedBatch.from_sequences([s.tolist() for s in grpo_batch(g, 3, 2, 7, 9, vocab=VOCAB)])
    for loss_fn in (sft_loss, token_separable(sft_loss, False)):
        eng.accumulate_grads(more, loss_fn, target_tokens)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
