"""Qwen3-MoE in the engine under expert parallelism (ep2, ep4, ep2 x tp2, and the folded hybrid
attn dp2 x tp2 | ffn ep4, where ep spans the tp ranks) equals one process.

Routing is skewed by the random tiny model, so some experts get no tokens on some ranks. The router's
aux-loss coefficient is 0 here: the aux loss is computed per micro-batch (as in Megatron), which is not the
same function as one aux loss over the whole batch, so it would differ by design.
"""

import sys
from pathlib import Path

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.engine import ArchonEngine
from archon.train import sft_loss, target_tokens
from archon_parallel import ParallelDims, ParallelPlan, parallelize
from archon_parallel.expert_folding import validate_folding
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same, global_batch, run_layouts, train_steps  # noqa: E402

FOLDED = "archon:(attn:d2t2|ffn:e4)"  # attention dp2 x tp2; experts ep4 over the same 4 ranks (edp 1)


def test_expert_parallel_layouts(moe_model_dir):
    reference = train_steps(moe_model_dir, "archon:d1")
    two = run_ranks(run_layouts, 2, moe_model_dir, [("archon:d2e2", "none")], timeout=400)
    four = run_ranks(_four_ranks, 4, moe_model_dir, [("archon:d4e4", "none"), ("archon:d2t2e2", "none"),
                                                     (FOLDED, "none")], timeout=600)
    ref_grads = first_step_grads(moe_model_dir, "archon:d1")
    for r in two:
        assert_same(reference, r["archon:d2e2/none"])
    for r in four:
        assert_same(reference, r["archon:d4e4/none"])
        assert_same(reference, r["archon:d2t2e2/none"])
        assert_same(reference, r[f"{FOLDED}/none"])
        for n, g in ref_grads.items():
            rel = float((r["folded_grads"][n] - g).norm() / g.norm().clamp(min=1e-30))
            assert rel <= 1e-5, f"{FOLDED} {n}: grad relative diff {rel:.2e}"


def first_step_grads(model_dir: str, allocation: str) -> dict[str, torch.Tensor]:
    """Full grads after one step's backward: AdamW's update is nearly invariant to a grad scale, so an expert
    grad off by the fold factor would hardly show in the parameters."""
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=96, seed=5)
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=1, device="cpu").initialize()
    rank, world = eng.dp_rank_world()
    full = global_batch(0)
    eng.accumulate_grads(full.select(list(range(rank, full.num_seqs, world))), sft_loss, target_tokens)
    return {n.replace("_checkpoint_wrapped_module.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                                                           else p.grad.clone())
            for n, p in eng.model.named_parameters()}


def _four_ranks(rank: int, world: int, model_dir: str, layouts: list[tuple[str, str]]) -> dict:
    return {**run_layouts(rank, world, model_dir, layouts), "folded_grads": first_step_grads(model_dir, FOLDED)}


def test_hybrid_expert_tp_must_divide_attention_tp():
    # ffn t2 over attn t1: the two etp ranks are dp ranks with different tokens; rejected before any mesh.
    dims = ParallelDims.from_allocation("archon:(attn:d4|ffn:e2t2)", world_size=4)
    with pytest.raises(ValueError, match="ffn t2 must divide attn t1"):
        parallelize(nn.Linear(2, 2), dims, ParallelPlan())
    with pytest.raises(ValueError, match="only wired together with expert parallel"):
        validate_folding(ParallelDims.from_allocation("archon:(attn:d2t2|ffn:d2t2)", world_size=4))
