"""LoRA on the real Qwen3 model under FSDP2, TP2, PP2 and FSDP2 x TP2, and expert LoRA on Qwen3-MoE under EP2
(CPU gloo), equals one process: losses, the LoRA factors after 3 AdamW steps and their gradients on a 4th batch,
<= 1e-5 relative (fp32); the merged export (every pipeline stage's layers under PP2) loads in transformers with the
logits of one process's merged export."""

import os
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


def lora_steps(model_dir: str, allocation: str, ac: str = "none", steps: int = 3, moe: bool = False,
               export_dir: str | None = None) -> dict:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=96, seed=5)
    actor.optimizer.lr = 1e-3
    # see engine_parallel_common.train_steps; LoRA factors (A random, B ~ lr after one step) need a larger eps
    actor.optimizer.eps = 1e-4
    actor.archon.ac_mode = ac
    actor.lora.enabled = True
    actor.lora.r = 4
    actor.lora.alpha = 8.0
    if moe:  # expert LoRA on every expert's w1/w2/w3 plus attention LoRA
        actor.lora.target_modules = ["q_proj", "o_proj"]
        actor.lora.expert_lora = True
    else:
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
    out = {"losses": losses, "params": {n: _full(p) for n, p in clean.items()},
           "grads": {n: _full(p.grad) for n, p in clean.items()}}
    if export_dir is not None:
        eng.export_weights(export_dir, dtype=torch.float32, merged=True)
        if eng.dims.pp > 1:
            with pytest.raises(ValueError, match=r"export_weights\(dir, merged=True\)"):
                eng.export_weights(export_dir + "_adapter", merged=False)
    return out


def _layouts(rank, world, model_dirs, layouts, out_root=None):
    sys.path.insert(0, str(Path(__file__).parent))
    return {f"{kind}:{alloc}/{ac}": lora_steps(model_dirs[kind], alloc, ac, moe=kind == "moe",
                                               export_dir=os.path.join(out_root, alloc) if out_root else None)
            for kind, alloc, ac in layouts}


_IDS = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))


def _hf_logits(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    with torch.no_grad():
        return hf(input_ids=_IDS).logits


def _assert_same(ref: dict, got: dict, layout: str, tol: float = 1e-5) -> None:
    if "p2" in layout:  # each stage holds its own layers' factors
        ref = {**ref, **{k: {n: v for n, v in ref[k].items() if n in got[k]} for k in ("params", "grads")}}
    for i, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
        assert abs(a - b) <= tol * abs(a), f"{layout} step {i}: loss {b} vs single-process {a}"
    for kind in ("params", "grads"):
        assert ref[kind].keys() == got[kind].keys()
        for n, a in ref[kind].items():
            rel = float((a - got[kind][n]).norm() / a.norm().clamp(min=1e-30))
            assert rel <= tol, f"{layout} {kind} {n}: relative diff {rel:.2e}"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d / "dense")
    # The load-balancing aux loss is computed per micro-batch, so it depends on how tokens are split across ranks
    # and micro-batches (and its gradient reaches attention LoRA through the router input): off for equality.
    moe = tiny_hf_config("qwen3_moe", vocab_size=64, num_hidden_layers=2, router_aux_loss_coef=0.0)
    hf_model(moe).save_pretrained(d / "moe")
    return {"dense": str(d / "dense"), "moe": str(d / "moe"), "root": str(d)}


@pytest.fixture(scope="module")
def reference(model_dirs):
    dense = lora_steps(model_dirs["dense"], "archon:d1", export_dir=os.path.join(model_dirs["root"], "merged_dense"))
    assert len(dense["grads"]) == 2 * 7 * 2 + 1  # A/B x 7 linears x 2 layers + lm_head copy
    moe = lora_steps(model_dirs["moe"], "archon:d1", moe=True, export_dir=os.path.join(model_dirs["root"], "merged_moe"))
    assert len(moe["grads"]) == 2 * (2 + 3) * 2  # A/B x (2 linears + 3 expert weights) x 2 layers
    for ref in (dense, moe):
        assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    return {"dense": dense, "moe": moe}


def test_lora_fsdp2_tp2_ep2_and_pp2(model_dirs, reference, tmp_path):
    layouts = [("dense", "archon:d2", "none"), ("dense", "archon:t2", "selective"), ("moe", "archon:d2e2", "none"),
               ("dense", "archon:p2", "none")]
    res = run_ranks(_layouts, 2, model_dirs, layouts, str(tmp_path), timeout=500)
    for r in res:
        for kind, alloc, ac in layouts:
            _assert_same(reference[kind], r[f"{kind}:{alloc}/{ac}"], f"{kind}:{alloc}/{ac}")
    for kind, alloc, _ in layouts:  # merged exports, p2 included (each stage writes its layers' shards)
        got, want = _hf_logits(str(tmp_path / alloc)), _hf_logits(os.path.join(model_dirs["root"], f"merged_{kind}"))
        assert (got - want).abs().max().item() <= 1e-5, alloc


def test_lora_fsdp2_x_tp2(model_dirs, reference):
    res = run_ranks(_layouts, 4, model_dirs, [("dense", "archon:d2t2", "none")], timeout=500)
    for r in res:
        _assert_same(reference["dense"], r["dense:archon:d2t2/none"], "d2t2")
