"""load_into_module: HF-named tensors (written by safetensors itself) into a native module."""

import json

import pytest
import torch
from archon_ckpt import HFSource, SafetensorsReader, load_into_module
from archon_ckpt.testing import hf_reference, native_to_hf
from safetensors.torch import save_file


class Fused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24, bias=False)
        self.o = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("cache", torch.zeros(3), persistent=False)


def _mapping(name):
    if name == "qkv.weight":
        keys = tuple(f"attn.{p}_proj.weight" for p in "qkv")
        return HFSource(keys, lambda ts: torch.cat(ts, dim=0))
    return {"o.weight": "attn.o_proj.weight", "o.bias": "attn.o_proj.bias", "scale": "norm.weight"}[name]


def _hf_dir(tmp_path, hf):
    """Sharded HF dir written with safetensors' save_file and a hand-made index (independent)."""
    d = tmp_path / "hf"
    d.mkdir()
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for fname, keys in shards.items():
        save_file({k: hf[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _hf_tensors():
    g = torch.Generator().manual_seed(0)
    hf = {f"attn.{p}_proj.weight": torch.randn(8, 8, generator=g, dtype=torch.bfloat16) for p in "qkvo"}
    hf["attn.o_proj.bias"] = torch.randn(8, generator=g)
    hf["norm.weight"] = torch.randn(8, generator=g)
    return hf


def test_fused_and_renamed_load(tmp_path):
    hf = _hf_tensors()
    m = Fused()
    report = load_into_module(m, SafetensorsReader(_hf_dir(tmp_path, hf)), native_to_hf=_mapping)
    assert sorted(report.loaded) == ["o.bias", "o.weight", "qkv.weight", "scale"] and report.unused == []
    assert m.qkv.weight.dtype == torch.float32
    assert torch.equal(m.qkv.weight[8:16], hf["attn.k_proj.weight"].float())
    assert torch.equal(m.o.weight, hf["attn.o_proj.weight"].float())
    assert torch.equal(m.scale, hf["norm.weight"])


def test_validates_everything_before_copying(tmp_path):
    hf = _hf_tensors()
    hf["attn.v_proj.weight"] = torch.randn(4, 8, dtype=torch.bfloat16)  # fused shape becomes [20, 8]
    del hf["attn.o_proj.bias"]
    hf["lm_head.weight"] = torch.randn(2, 2)
    m = Fused()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_into_module(m, SafetensorsReader(_hf_dir(tmp_path, hf)), native_to_hf=_mapping)
    msg = str(info.value)
    assert "nothing was loaded" in msg
    assert "missing tensor(s) ['attn.o_proj.bias'] for 'o.bias'" in msg
    assert "shape mismatch for 'qkv.weight'" in msg and "gives [20, 8], model expects [24, 8]" in msg
    assert "unexpected tensor 'lm_head.weight' in" in msg and "model-0000" in msg
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the unexpected tensor alone can be ignored
    hf = _hf_tensors()
    hf["rotary.inv_freq"] = torch.ones(2)
    (tmp_path / "b").mkdir()
    r = SafetensorsReader(_hf_dir(tmp_path / "b", hf))
    with pytest.raises(ValueError, match="unexpected tensor 'rotary.inv_freq'"):
        load_into_module(m, r, native_to_hf=_mapping)
    rep = load_into_module(m, r, native_to_hf=_mapping, ignore_unexpected=[r"inv_freq$"])
    assert rep.unused == []


def test_meta_params_rejected(tmp_path):
    with torch.device("meta"):
        m = Fused()
    with pytest.raises(ValueError, match="meta device; call module.to_empty"):
        load_into_module(m, SafetensorsReader(_hf_dir(tmp_path, _hf_tensors())), native_to_hf=_mapping)


def test_toy_model_identity_names(tmp_path):
    from archon_ckpt.testing import make_model

    ref = make_model(3)
    save_file(hf_reference(ref), str(tmp_path / "m.safetensors"))
    m = make_model(4)
    load_into_module(m, SafetensorsReader(tmp_path / "m.safetensors"), native_to_hf=native_to_hf)
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
