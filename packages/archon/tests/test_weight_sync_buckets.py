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


def test_lora_is_merged_like_the_export(tmp_path):
    """A LoRA engine streams base + B @ A * scale, the tensors the merged HF export writes."""
    from archon.config.schema import ActorConfig
    from archon.engine.engine import ArchonEngine
    from archon.lora_integration import iter_merged_hf_tensors

    archon.save_pretrained(archon.from_pretrained(TINY, seed=4), tmp_path)
    actor = ActorConfig(path=str(tmp_path), dtype="float32")
    actor.lora.enabled, actor.lora.r, actor.lora.alpha = True, 4, 8.0
    model = ArchonEngine(actor, device="cpu").initialize().model
    with torch.no_grad():  # B starts at zero: make the update visible
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    got = dict(iter_full_hf_tensors(model, dtype=torch.float32))
    ref = dict(iter_merged_hf_tensors(model, torch.float32))
    base = dict(iter_hf_tensors(archon.from_pretrained(str(tmp_path))))
    assert got.keys() == ref.keys() == base.keys()
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
