"""`iter_full_hf_tensors` + `hf_buckets`: bounded buckets whose contents equal a single-process HF export, and a
consumer that drops each bucket holds about one bucket of gathered bytes (counted with weakref finalizers)."""

import json
import weakref
from pathlib import Path

import archon
import pytest
import torch
from archon.engine.weight_sync import hf_buckets, iter_full_hf_tensors
from archon.hf import iter_hf_tensors

TINY = json.loads((Path(__file__).parents[3] / "examples/tiny_qwen3/config.json").read_text())
LIMIT = 20_000


def _stream(model, *, keep: bool) -> tuple[int, int, list[int], dict]:
    """(peak live gathered bytes, largest tensor, bucket sizes, copies of the tensors) of one pass."""
    live = {"bytes": 0}
    peak, largest, sizes, got, kept = 0, 0, [], {}, []

    def release(n: int) -> None:
        live["bytes"] -= n

    for bucket in hf_buckets(iter_full_hf_tensors(model, dtype=torch.bfloat16), LIMIT):
        for name, t in bucket:
            n = t.numel() * t.element_size()
            live["bytes"] += n
            weakref.finalize(t, release, n)
            got[name] = t.clone()  # the test's own copy is not gathered memory
            largest = max(largest, n)
        peak = max(peak, live["bytes"])
        sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        if keep:
            kept.append(bucket)
        del bucket, t
    return peak, largest, sizes, got


def test_buckets_bounded_and_equal_to_export():
    model = archon.from_pretrained(TINY, seed=3)
    peak, largest, sizes, got = _stream(model, keep=False)
    assert len(sizes) >= 4
    assert all(s <= LIMIT for s in sizes if s > largest)
    assert peak <= LIMIT + largest, (peak, LIMIT)
    ref = dict(iter_hf_tensors(model, torch.bfloat16))
    assert got.keys() == ref.keys()
    for n, t in ref.items():
        assert torch.equal(got[n], t), n


def test_counter_sees_a_retaining_consumer():
    """The counter can fail: a consumer that keeps every bucket holds the whole model."""
    peak, largest, sizes, _ = _stream(archon.from_pretrained(TINY, seed=3), keep=True)
    assert peak == sum(sizes) > LIMIT + largest


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="bucket size"):
        next(hf_buckets(iter([]), 0))
