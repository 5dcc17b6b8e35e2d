"""Qwen3-MoE in the engine under expert parallelism (ep2, ep4, ep2 x tp2) equals one process.

Routing is skewed by the random tiny model, so some experts get no tokens on some ranks. The router's
aux-loss coefficient is 0 here: the aux loss is computed per micro-batch (as in Megatron), which is not the
same function as one aux loss over the whole batch, so it would differ by design.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_parallel_common import assert_same, train_steps  # noqa: E402

from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402


def _layouts(rank, world, model_dir, layouts):
    sys.path.insert(0, str(Path(__file__).parent))
    return {alloc: train_steps(model_dir, alloc) for alloc in layouts}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    cfg = tiny_hf_config("qwen3_moe", vocab_size=64, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.0)
    hf_model(cfg).save_pretrained(d)
    return str(d)


def test_expert_parallel_layouts(model_dir):
    reference = train_steps(model_dir, "archon:d1")
    two = run_ranks(_layouts, 2, model_dir, ["archon:d2e2"], timeout=400)
    four = run_ranks(_layouts, 4, model_dir, ["archon:d4e4", "archon:d2t2e2"], timeout=600)
    for r in two:
        assert_same(reference, r["archon:d2e2"])
    for r in four:
        assert_same(reference, r["archon:d4e4"])
        assert_same(reference, r["archon:d2t2e2"])
