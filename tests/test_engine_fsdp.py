"""The engine under FSDP2 / HSDP on CPU gloo ranks equals one process (fp32, 3 AdamW steps)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from archon_parallel.testing import run_ranks  # noqa: E402
from engine_parallel_common import assert_same, run_layouts, train_steps  # noqa: E402


def test_fsdp2_two_ranks(dense_model_dir):
    ref = {ac: train_steps(dense_model_dir, "archon:d1", ac) for ac in ("none", "selective")}
    res = run_ranks(run_layouts, 2, dense_model_dir, [("archon:d2", "none"), ("archon:d2", "selective")],
                    timeout=400)
    for r in res:
        assert_same(ref["none"], r["archon:d2/none"])
        assert_same(ref["selective"], r["archon:d2/selective"])


def test_fsdp4_and_hsdp_2x2(dense_model_dir):
    ref = {ac: train_steps(dense_model_dir, "archon:d1", ac) for ac in ("none", "selective")}
    res = run_ranks(run_layouts, 4, dense_model_dir, [("archon:d4", "none"), ("archon:r2d2", "selective")],
                    timeout=500)
    for r in res:
        assert_same(ref["none"], r["archon:d4/none"])
        assert_same(ref["selective"], r["archon:r2d2/selective"])


def test_fsdp2_tied_embeddings(tied_model_dir):
    """A tied embedding / head weight is one FSDP2 unit with the head (two units holding it are rejected)."""
    ref = train_steps(tied_model_dir, "archon:d1")
    assert torch.equal(ref["params"]["output.weight"], ref["params"]["tok_embeddings.weight"])  # tied: one weight
    for r in run_ranks(run_layouts, 2, tied_model_dir, [("archon:d2", "none")], timeout=400):
        assert_same(ref, r["archon:d2/none"])
