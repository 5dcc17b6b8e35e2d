"""The engine under TP2 (+SP, vocab-parallel logprobs) and FSDP2 x TP2 on CPU gloo ranks equals one process."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_parallel_common import assert_same, train_steps  # noqa: E402

from archon.testing import hf_model, tiny_hf_config  # noqa: E402
from archon_parallel.testing import run_ranks  # noqa: E402


def _layouts(rank, world, model_dir, layouts):
    sys.path.insert(0, str(Path(__file__).parent))
    return {f"{alloc}/{ac}": train_steps(model_dir, alloc, ac) for alloc, ac in layouts}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def reference(model_dir):
    return {ac: train_steps(model_dir, "archon:d1", ac) for ac in ("none", "selective")}


def test_tp2_with_sequence_parallel(model_dir, reference):
    res = run_ranks(_layouts, 2, model_dir, [("archon:t2", "none"), ("archon:t2", "selective")], timeout=400)
    for r in res:
        assert_same(reference["none"], r["archon:t2/none"])
        assert_same(reference["selective"], r["archon:t2/selective"])


def test_fsdp2_x_tp2(model_dir, reference):
    res = run_ranks(_layouts, 4, model_dir, [("archon:d2t2", "none"), ("archon:d2t2", "selective")], timeout=500)
    for r in res:
        assert_same(reference["none"], r["archon:d2t2/none"])
        assert_same(reference["selective"], r["archon:d2t2/selective"])
