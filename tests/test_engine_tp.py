"""The engine under TP2 (+SP, vocab-parallel logprobs) and FSDP2 x TP2 on CPU gloo ranks equals one process."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same, run_layouts, train_steps  # noqa: E402


def test_tp2_and_fsdp2_x_tp2(dense_model_dir):
    ref = {ac: train_steps(dense_model_dir, "archon:d1", ac) for ac in ("none", "selective")}
    two = run_ranks(run_layouts, 2, dense_model_dir, [("archon:t2", "none"), ("archon:t2", "selective")],
                    timeout=400)
    four = run_ranks(run_layouts, 4, dense_model_dir, [("archon:d2t2", "none"), ("archon:d2t2", "selective")],
                     timeout=500)
    for r in two:
        assert_same(ref["none"], r["archon:t2/none"])
        assert_same(ref["selective"], r["archon:t2/selective"])
    for r in four:
        assert_same(ref["none"], r["archon:d2t2/none"])
        assert_same(ref["selective"], r["archon:d2t2/selective"])
