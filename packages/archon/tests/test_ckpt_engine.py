"""Engine checkpoints: save at archon:d2, resume at archon:d1 and archon:t2 (model + optimizer + schedule reshard)
with the following losses equal to the straight run; `archon export-hf` of a training checkpoint loads in
transformers with the engine's logits (dense qwen3 and qwen3_moe); adapter-only LoRA checkpoints."""

import os
import sys
from pathlib import Path

import pytest
import torch
from archon.config.schema import ActorConfig, CheckpointConfig
from archon.engine.checkpoint import EngineCheckpointer
from archon.engine.engine import ArchonEngine
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens
from archon_parallel.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from engine_parallel_common import global_batch  # noqa: E402

IDS = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))


def _engine(model_dir: str, allocation: str, steps: int = 6, **lora) -> ArchonEngine:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=96, seed=5)
    actor.optimizer.lr = 1e-3
    actor.optimizer.eps = 1e-6  # see engine_parallel_common.train_steps
    actor.optimizer.lr_scheduler_type = "cosine"
    actor.optimizer.warmup_steps_proportion = 0.34
    if lora:
        actor.lora.enabled = True
        for k, v in lora.items():
            setattr(actor.lora, k, v)
    return ArchonEngine(actor, allocation_mode=allocation, total_steps=steps, device="cpu").initialize()


def _steps(eng: ArchonEngine, start: int, n: int) -> list[float]:
    out = []
    for step in range(start, start + n):
        full = global_batch(step)
        rank, world = eng.dp_rank_world()
        out.append(eng.train_batch(full.select(list(range(rank, full.num_seqs, world))), sft_loss,
                                   target_tokens)["loss"])
    return out


def _save_then_resume_tp(rank, world, model_dir, ckpt_dir):
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    eng = _engine(model_dir, "archon:d2")
    _steps(eng, 0, 3)
    ck = EngineCheckpointer(eng, CheckpointConfig(dir=ckpt_dir))
    ck.save(3)
    ck.close()
    straight = _steps(eng, 3, 3)
    tp = _engine(model_dir, "archon:t2")
    ck = EngineCheckpointer(tp, CheckpointConfig(dir=ckpt_dir, resume="auto"))
    assert ck.maybe_resume() == 3 and tp.version == 3
    return {"straight": straight, "t2": _steps(tp, 3, 3)}


def _close(a: list[float], b: list[float], tol: float) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(x - y) <= tol * abs(x), f"step {i}: {y} vs straight {x}"


def _export_and_compare(eng: ArchonEngine, ckpt_dir: str, model_dir: str, out: str) -> None:
    from archon.cli import main
    from transformers import AutoModelForCausalLM

    assert main(["export-hf", ckpt_dir, out, "--model", model_dir, "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    with torch.no_grad():
        want = eng.model.eval()(IDS)
        got = hf(input_ids=IDS).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


def test_reshard_d2_to_d1_and_t2_and_export_hf(dense_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    res = run_ranks(_save_then_resume_tp, 2, dense_dir, ckpt, timeout=400)
    straight = res[0]["straight"]
    for r in res:
        _close(straight, r["t2"], 1e-6)
    one = _engine(dense_dir, "archon:d1")
    assert EngineCheckpointer(one, CheckpointConfig(dir=ckpt, resume="3")).maybe_resume() == 3
    _export_and_compare(one, ckpt, dense_dir, str(tmp_path / "hf"))
    _close(straight, _steps(one, 3, 3), 1e-6)


def test_export_hf_qwen3_moe(tmp_path):
    d = str(tmp_path / "moe")
    hf_model(tiny_hf_config("qwen3_moe", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    eng = _engine(d, "archon:d1")
    _steps(eng, 0, 2)
    EngineCheckpointer(eng, CheckpointConfig(dir=str(tmp_path / "ckpt"))).save(2)
    _export_and_compare(eng, str(tmp_path / "ckpt"), d, str(tmp_path / "hf"))


def test_adapter_only_checkpoint(dense_dir, tmp_path, capsys):
    from archon_ckpt import Checkpointer, iter_dcp_tensors

    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), adapter_only=True)
    eng = _engine(dense_dir, "archon:d1", r=4, target_modules=["q_proj", "down_proj"])
    _steps(eng, 0, 2)
    EngineCheckpointer(eng, cfg).save(2)
    step_dir = str(Checkpointer(cfg.dir).step_path(2))
    names = [n for n, _ in iter_dcp_tensors(step_dir, prefix="model.")]
    assert sorted(names) == sorted(f"layers.{i}.{m}.lora_{ab}" for i in range(2)
                                   for m in ("attention.wq", "feed_forward.w2") for ab in "AB")
    straight = _steps(eng, 2, 2)
    again = _engine(dense_dir, "archon:d1", r=4, target_modules=["q_proj", "down_proj"])
    cfg.resume = "auto"
    assert EngineCheckpointer(again, cfg).maybe_resume() == 2
    assert _steps(again, 2, 2) == straight  # same process, same layout: bitwise
    assert os.path.getsize(os.path.join(step_dir, ".metadata")) > 0

    from archon.cli import main

    assert main(["export-hf", cfg.dir, str(tmp_path / "hf"), "--model", dense_dir]) == 2
    assert "LoRA training checkpoint" in capsys.readouterr().err
    assert main(["export-hf", cfg.dir, str(tmp_path / "hf"), "--model", dense_dir, "--dtype", "fp8"]) == 2
    assert "export dtype 'fp8'" in capsys.readouterr().err
