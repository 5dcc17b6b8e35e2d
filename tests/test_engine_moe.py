"""Qwen3-MoE in the engine under expert parallelism (ep2, ep4, ep2 x tp2) equals one process.

Routing is skewed by the random tiny model, so some experts get no tokens on some ranks. The router's
aux-loss coefficient is 0 here: the aux loss is computed per micro-batch (as in Megatron), which is not the
same function as one aux loss over the whole batch, so it would differ by design.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same, run_layouts, train_steps  # noqa: E402


def test_expert_parallel_layouts(moe_model_dir):
    reference = train_steps(moe_model_dir, "archon:d1")
    two = run_ranks(run_layouts, 2, moe_model_dir, [("archon:d2e2", "none")], timeout=400)
    four = run_ranks(run_layouts, 4, moe_model_dir, [("archon:d4e4", "none"), ("archon:d2t2e2", "none")], timeout=600)
    for r in two:
        assert_same(reference, r["archon:d2e2/none"])
    for r in four:
        assert_same(reference, r["archon:d4e4/none"])
        assert_same(reference, r["archon:d2t2e2/none"])
