"""LoRA on the real Qwen3 model under FSDP2, TP2 and FSDP2 x TP2 (CPU gloo) equals one process: losses, the LoRA
factors after 3 AdamW steps and their gradients on a 4th batch, <= 1e-5 relative (fp32)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from archon.config.schema import ActorConfig  # noqa: E402
from archon.engine.engine import ArchonEngine  # noqa: E402
from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon.train import sft_loss, target_tokens  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import global_batch  # noqa: E402


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def lora_steps(model_dir: str, allocation: str, ac: str = "none", steps: int = 3) -> dict:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=96, seed=5)
    actor.optimizer.lr = 1e-3
    actor.optimizer.eps = 1e-6  # see engine_parallel_common.train_steps
    actor.archon.ac_mode = ac
    actor.lora.enabled = True
    actor.lora.r = 4
    actor.lora.alpha = 8.0
    actor.lora.modules_to_save = ["lm_head"]  # a fully trainable, vocab-parallel module next to the LoRA pairs
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=steps + 1, device="cpu").initialize()
    losses = []
    for step in range(steps + 1):
        full = global_batch(step)
        rank, world = eng.dp_rank_world()
        mine = full.select(list(range(rank, full.num_seqs, world)))
        if step < steps:
            losses.append(eng.train_batch(mine, sft_loss, target_tokens)["loss"])
        else:
            eng.accumulate_grads(mine, sft_loss, target_tokens)
    clean = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p
             for n, p in eng.model.named_parameters() if p.requires_grad}
    return {"losses": losses, "params": {n: _full(p) for n, p in clean.items()},
            "grads": {n: _full(p.grad) for n, p in clean.items()}}


def _layouts(rank, world, model_dir, layouts):
    sys.path.insert(0, str(Path(__file__).parent))
    return {f"{alloc}/{ac}": lora_steps(model_dir, alloc, ac) for alloc, ac in layouts}


def _assert_same(ref: dict, got: dict, tol: float = 1e-5) -> None:
    for i, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
        assert abs(a - b) <= tol * abs(a), f"step {i}: loss {b} vs single-process {a}"
    for kind in ("params", "grads"):
        assert ref[kind].keys() == got[kind].keys()
        for n, a in ref[kind].items():
            rel = float((a - got[kind][n]).norm() / a.norm().clamp(min=1e-30))
            assert rel <= tol, f"{kind} {n}: relative diff {rel:.2e}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def reference(model_dir):
    ref = lora_steps(model_dir, "archon:d1")
    assert len(ref["grads"]) == 2 * 7 * 2 + 1  # A/B x 7 linears x 2 layers + lm_head copy
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    return ref


def test_lora_fsdp2_and_tp2(model_dir, reference):
    res = run_ranks(_layouts, 2, model_dir, [("archon:d2", "none"), ("archon:t2", "selective")], timeout=400)
    for r in res:
        _assert_same(reference, r["archon:d2/none"])
        _assert_same(reference, r["archon:t2/selective"])


def test_lora_fsdp2_x_tp2(model_dir, reference):
    res = run_ranks(_layouts, 4, model_dir, [("archon:d2t2", "none")], timeout=500)
    for r in res:
        _assert_same(reference, r["archon:d2t2/none"])
