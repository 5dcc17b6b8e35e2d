"""`actor.archon.dp_layout=zero1` (full replicas, all-reduced grads, ZeRO-1 AdamW state) on 2 gloo ranks equals
single-process flat training (fp32, 3 AdamW steps, losses and parameters <= 1e-5): flat, dta (blocks,
several micro-batches, padding micro-batches) and sparse. Its sharded optimizer checkpoint resumes exactly (and into
an FSDP engine), and combinations that would shard the model are rejected by rule."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from archon.config.schema import ActorConfig  # noqa: E402
from archon.config.validate import validate_engine  # noqa: E402
from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon.train import sft_loss, target_tokens  # noqa: E402
from archon_parallel.dims import ParallelDims  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same  # noqa: E402
from test_tree_fsdp import VOCAB, tree_global_batch, tree_train_steps  # noqa: E402


def _engine(model_dir: str, dp_layout: str = "zero1"):
    from archon.engine.engine import ArchonEngine

    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=4096, seed=5)
    actor.optimizer.lr = 1e-3
    actor.archon.dp_layout = dp_layout
    return ArchonEngine(actor, allocation_mode="archon:d2", total_steps=3, device="cpu").initialize()


def _step(eng, step: int) -> float:
    from archon.tree import balance_for_tree

    rank, world = eng.dp_rank_world()
    return eng.train_batch(balance_for_tree(tree_global_batch(step), rank, world), sft_loss, target_tokens)["loss"]


def _resume(model_dir: str, ckpt_dir: str) -> dict:
    """2 steps, checkpoint, step 3; then fresh zero1 and fsdp engines load the checkpoint and run step 3 again."""
    from archon.config.schema import CheckpointConfig
    from archon.engine.checkpoint import EngineCheckpointer

    eng = _engine(model_dir)
    owned = sum(p.numel() for g in eng.optimizer.optim.param_groups for p in g["params"])
    total = sum(p.numel() for p in eng.model.parameters())
    _step(eng, 0)
    _step(eng, 1)
    ck = EngineCheckpointer(eng, CheckpointConfig(dir=ckpt_dir))
    ck.save(2)
    ck.close()
    want = _step(eng, 2)
    got = {}
    for layout in ("zero1", "fsdp"):  # same keys as an FSDP optimizer checkpoint: it reshards across layouts
        again = _engine(model_dir, layout)
        ck2 = EngineCheckpointer(again, CheckpointConfig(dir=ckpt_dir, resume="auto"))
        assert ck2.maybe_resume() == 2
        ck2.close()
        got[layout] = _step(again, 2)
    return {"want": want, "got": got, "owned": owned, "total": total}


def _zero1_layouts(rank, world, model_dir, layouts, ckpt_dir):
    out = {name: tree_train_steps(model_dir, "archon:d2", dp_layout="zero1", **kw) for name, kw in layouts.items()}
    out["resume"] = _resume(model_dir, ckpt_dir)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero1")
    hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


def test_zero1_two_ranks_equal_flat_single_process(model_dir, tmp_path):
    torch.set_num_threads(1)
    ref = tree_train_steps(model_dir, "archon:d1", "disabled")
    layouts = {
        "flat": dict(mode="disabled", mb_max_tokens=30),
        "dta": dict(mode="dta", tree_dta_block_size=3, mb_max_tokens=30),
        "sparse": dict(mode="sparse", mb_max_tokens=30),
    }
    res = run_ranks(_zero1_layouts, 2, model_dir, layouts, str(tmp_path / "ckpt"), timeout=300)
    for name in layouts:
        for r in res:
            assert_same(ref, r[name])
    for r in res:
        resume = r["resume"]
        assert resume["got"]["zero1"] == resume["want"]  # bitwise
        assert abs(resume["got"]["fsdp"] - resume["want"]) <= 1e-5 * abs(resume["want"])
    owned = [r["resume"]["owned"] for r in res]
    assert 0 < owned[0] < res[0]["resume"]["total"] and sum(owned) == res[0]["resume"]["total"]  # sharded state


def _cfg(**archon) -> ActorConfig:
    actor = ActorConfig()
    actor.archon.dp_layout = "zero1"
    for k, v in archon.items():
        setattr(actor.archon, k, v)
    return actor


@pytest.mark.parametrize("allocation, world, archon, match", [
    ("archon:d2t2", 4, {}, "rule zero1-pure-dp.*t \\(tensor\\)=2"),
    ("archon:d2p2", 4, {}, "rule zero1-pure-dp.*p \\(pipeline\\)=2"),
    ("archon:d2c2", 4, {}, "rule zero1-pure-dp.*c \\(context\\)=2"),
    ("archon:r2d2", 4, {}, "rule zero1-pure-dp.*r \\(FSDP replicate\\)=2"),
    ("archon:d4e2", 4, {}, "rule zero1-pure-dp.*e \\(expert\\)=2"),
    ("archon:d2", 2, {"offload_params": True}, "rule offload-needs-fsdp"),
    ("archon:d2", 2, {"reshard_after_forward": "never"}, "rule zero1-no-reshard"),
    ("archon:d2", 2, {"dp_layout": "ddp"}, "dp_layout 'ddp' is not one of"),
])
def test_zero1_rejects_sharding_combinations(allocation, world, archon, match):
    dims = ParallelDims.from_allocation(allocation, world)
    with pytest.raises(ValueError, match=match):
        validate_engine(_cfg(**archon), dims, torch.device("cpu"))


def test_zero1_pure_dp_is_valid():
    validate_engine(_cfg(tree_training_mode="dta"), ParallelDims.from_allocation("archon:d4", 4), torch.device("cpu"))
