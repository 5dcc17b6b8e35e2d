"""The engine under pipeline parallelism (1F1B, Interleaved1F1B; with FSDP2, TP, and a MoE model) on CPU gloo
ranks equals one process: fp32, 3 AdamW steps, losses and final parameters <= 1e-5 rel, and forward_batch
logprobs after training."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same, global_batch  # noqa: E402


def _run(model_dir: str, allocation: str, steps: int = 3, **archon_kw) -> dict:
    """3 training steps on the shared global batch, then logprobs of a fresh batch; params merged later."""
    from archon.config.schema import ActorConfig
    from archon.engine.engine import ArchonEngine
    from archon.train import sft_loss, target_tokens

    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=96, seed=5)
    actor.optimizer.lr = 1e-3
    actor.optimizer.eps = 1e-6  # see engine_parallel_common.train_steps
    for k, v in archon_kw.items():
        setattr(actor.archon, k, v)
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=steps, device="cpu").initialize()
    rank, world = eng.dp_rank_world()
    losses = []
    for step in range(steps):
        full = global_batch(step)
        losses.append(eng.train_batch(full.select(list(range(rank, full.num_seqs, world))), sft_loss,
                                      target_tokens)["loss"])
    probe = global_batch(99)
    lp = eng.forward_batch(probe, want_entropy=True)
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
              for n, p in eng.model.state_dict().items()}
    clean = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for n, v in params.items()}
    return {"losses": losses, "params": clean, "logprobs": lp["logprobs"], "entropy": lp["entropy"]}


def _layouts(rank, world, layouts):
    sys.path.insert(0, str(Path(__file__).parent))
    torch.manual_seed(0)
    return {name: _run(model_dir, alloc, **kw) for name, model_dir, alloc, kw in layouts}


def _merged(per_rank: list[dict], name: str) -> dict:
    """Each pp rank holds its stages' parameters: the union over ranks is the whole model."""
    out = dict(per_rank[0][name])
    out["params"] = {}
    for r in per_rank:
        out["params"].update(r[name]["params"])
    return out


def _check(ref: dict, got: dict) -> None:
    assert_same(ref, got)
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)


def _save(d, model_type: str, layers: int):
    hf_model(tiny_hf_config(model_type, vocab_size=64, num_hidden_layers=layers)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("dense"), "qwen3", 4)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("moe"), "qwen3_moe", 2)


@pytest.fixture(scope="module")
def reference(dense_dir, moe_dir):
    return {"dense": _run(dense_dir, "archon:d1"), "moe": _run(moe_dir, "archon:d1")}


def test_pp2_schedules_and_moe(dense_dir, moe_dir, reference):
    layouts = [("1f1b", dense_dir, "archon:p2", {"pp_schedule": "1F1B"}),
               ("interleaved", dense_dir, "archon:p2", {"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2}),
               # the MoE aux loss depends on how tokens are grouped into micro-batches: keep the reference's 2
               ("moe", moe_dir, "archon:p2", {"pp_schedule": "1F1B", "pp_microbatches": 2})]
    res = run_ranks(_layouts, 2, layouts, timeout=500)
    _check(reference["dense"], _merged(res, "1f1b"))
    _check(reference["dense"], _merged(res, "interleaved"))
    _check(reference["moe"], _merged(res, "moe"))


def test_pp2_with_fsdp2_and_tp2(dense_dir, reference):
    layouts = [("pp_dp", dense_dir, "archon:p2d2", {"pp_schedule": "1F1B"}),
               ("pp_tp", dense_dir, "archon:p2t2", {"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2})]
    res = run_ranks(_layouts, 4, layouts, timeout=600)
    _check(reference["dense"], _merged(res, "pp_dp"))
    _check(reference["dense"], _merged(res, "pp_tp"))
