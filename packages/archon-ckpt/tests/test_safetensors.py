"""Safetensors sharded writer + lazy reader, checked against safetensors' own load_file."""

import json
import os

import pytest
import torch
from archon_ckpt import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SafetensorsReader,
    atomic_directory,
    parse_size,
    save_safetensors_sharded,
)
from safetensors.torch import load_file, save_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.w": torch.randn(16, 8, generator=g) for i in range(6)}
    out["embed.weight"] = torch.randn(32, 8, generator=g)
    out["steps"] = torch.arange(7)
    return out


def test_sharded_round_trip_and_hf_layout(tmp_path):
    ts = _tensors()
    out = tmp_path / "hf"
    files = save_safetensors_sharded(ts.items(), out, max_shard_size=1200)  # 16*8*4 = 512 B per layer
    assert len(files) > 2
    names = sorted(os.listdir(out))
    n = len(files)
    assert names == sorted([SAFE_WEIGHTS_INDEX_NAME] + [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                        for i in range(1, n + 1)])
    index = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    # each shard readable by safetensors itself, under the limit, consistent with the index
    seen = {}
    for f in files:
        loaded = load_file(str(f))
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= 1200 or len(loaded) == 1
        for k, v in loaded.items():
            assert index["weight_map"][k] == f.name
            seen[k] = v
    assert seen.keys() == ts.keys()
    for k in ts:
        assert torch.equal(seen[k], ts[k])
    with SafetensorsReader(out) as r:
        assert r.keys() == sorted(ts)
        for k, v in ts.items():
            assert r.shape(k) == v.shape and r.dtype(k) == v.dtype
            assert torch.equal(r.get(k), v)
        assert torch.equal(r.get_slice("embed.weight", (slice(4, 9), slice(2, 5))), ts["embed.weight"][4:9, 2:5])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


def test_single_file_dtype_and_metadata(tmp_path):
    ts = _tensors()
    out = tmp_path / "single"
    save_safetensors_sharded(ts, out, dtype=torch.bfloat16)
    assert os.listdir(out) == [SAFE_WEIGHTS_NAME]
    loaded = load_file(str(out / SAFE_WEIGHTS_NAME))
    assert loaded["layers.0.w"].dtype == torch.bfloat16 and loaded["steps"].dtype == torch.int64
    assert torch.equal(loaded["layers.3.w"], ts["layers.3.w"].to(torch.bfloat16))
    r = SafetensorsReader(out / SAFE_WEIGHTS_NAME)
    assert r.metadata == {"format": "pt"}


def test_tied_views_and_duplicates(tmp_path):
    w = torch.randn(4, 4)
    save_safetensors_sharded([("a", w), ("b", w), ("c", w[1:3])], tmp_path / "t")
    loaded = load_file(str(tmp_path / "t" / SAFE_WEIGHTS_NAME))
    assert torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w[1:3])
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        save_safetensors_sharded([("a", w), ("a", w)], tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_reader_errors_name_the_file(tmp_path):
    ts = _tensors()
    out = tmp_path / "hf"
    files = save_safetensors_sharded(ts, out, max_shard_size=1200)
    with pytest.raises(FileNotFoundError, match="neither"):
        SafetensorsReader(tmp_path)
    # truncated shard
    victim = files[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"truncated safetensors file {victim}"):
        SafetensorsReader(out)
    victim.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=f"corrupt safetensors file {victim}"):
        SafetensorsReader(out)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing shard file {victim}"):
        SafetensorsReader(out)
    # index naming a tensor its shard lacks
    single = tmp_path / "s"
    save_file({"x": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    single.mkdir()
    os.rename(tmp_path / "x.safetensors", single / "a.safetensors")
    (single / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "a.safetensors",
                                                                             "y": "a.safetensors"}}))
    with pytest.raises(ValueError, match=r"does not contain them, e.g. \['y'\]"):
        SafetensorsReader(single)
    with pytest.raises(KeyError, match="'nope' not found"):
        SafetensorsReader(single / "a.safetensors").get("nope")


def test_atomic_directory(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as d:
        (d / "f").write_text("v1")
    assert (final / "f").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as d:
            (d / "f").write_text("v2")
            raise RuntimeError("boom")
    assert (final / "f").read_text() == "v1"
    with atomic_directory(final) as d:
        (d / "g").write_text("v3")
    assert sorted(os.listdir(final)) == ["g"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(7) == 7
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five")
