"""Bad adapters give a clear ValueError naming the key, and nothing is half-loaded."""

import json
import os

import pytest
import torch
from archon_lora import (
    LoRAConfig,
    inject_lora,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    save_peft_adapter,
)
from safetensors.torch import load_file, save_file
from torch import nn

# Native names "layers.0.wq.weight" <-> HF names "model.layers.0.self_attn.q_proj.weight".
_TO_HF = {"wq": "self_attn.q_proj", "wo": "self_attn.o_proj"}


def to_hf(name: str) -> str:
    for native, hf in _TO_HF.items():
        name = name.replace(f".{native}.", f".{hf}.")
    return "model." + name if name.startswith("layers.") else name


def from_hf(name: str) -> str:
    for native, hf in _TO_HF.items():
        name = name.replace(f".{hf}.", f".{native}.")
    return name.removeprefix("model.")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(8, 8)
        self.wo = nn.Linear(8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 5)


def saved_adapter(path, r=4, targets=("q_proj", "o_proj"), save=()):
    model = inject_lora(Net(), LoRAConfig(r=r, alpha=8, target_modules=list(targets), modules_to_save=list(save)),
                        name_aliases={"q_proj": "wq", "o_proj": "wo"})
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B)
    cfg = LoRAConfig(r=r, alpha=8, target_modules=list(targets), modules_to_save=list(save))
    save_peft_adapter(model, str(path), cfg, to_hf_name=to_hf)
    return model


def fresh(r=4, targets=("wq", "wo"), save=()):
    return inject_lora(Net(), LoRAConfig(r=r, alpha=8, target_modules=list(targets), modules_to_save=list(save)))


def test_round_trip_with_name_mapping(tmp_path):
    src = saved_adapter(tmp_path, save=["head"])
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in keys
    assert "base_model.model.head.weight" in keys
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["o_proj", "q_proj"] and cfg["modules_to_save"] == ["head"]
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["lora_alpha"] == 8
    dst = fresh(save=["head"])
    load_peft_adapter(dst, str(tmp_path), from_hf_name=from_hf)
    want, got = lora_state_dict(src), lora_state_dict(dst)
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def _unchanged(model, before):
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_rank_mismatch(tmp_path):
    saved_adapter(tmp_path, r=4)
    model = fresh(r=2)
    before = lora_state_dict(model)
    with pytest.raises(ValueError, match=r"rank mismatch for 'base_model\.model\..*lora_A\.weight'.*r=4.*r=2"):
        load_peft_adapter(model, str(tmp_path), from_hf_name=from_hf)
    _unchanged(model, before)


def test_unknown_target_module(tmp_path):
    saved_adapter(tmp_path)  # q_proj and o_proj
    model = fresh(targets=("wq",))
    before = lora_state_dict(model)
    with pytest.raises(ValueError, match=r"unexpected key '.*o_proj\.lora_A\.weight'.*layers\.0\.wo\.weight"):
        load_peft_adapter(model, str(tmp_path), from_hf_name=from_hf)
    _unchanged(model, before)


def test_missing_key(tmp_path):
    saved_adapter(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    sd = load_file(path)
    del sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(sd, path)
    model = fresh()
    before = lora_state_dict(model)
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.wq\.weight \(lora_B\)"):
        load_peft_adapter(model, str(tmp_path), from_hf_name=from_hf)
    _unchanged(model, before)


def test_shape_and_config_errors(tmp_path):
    saved_adapter(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    sd = load_file(path)
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 9)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"shape mismatch for '.*layers\.0\.self_attn\.q_proj\.lora_A\.weight'"):
        load_peft_adapter(fresh(), str(tmp_path), from_hf_name=from_hf)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(fresh(), str(tmp_path), from_hf_name=from_hf)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft_adapter(fresh(), str(tmp_path / "nowhere"), from_hf_name=from_hf)


def test_save_rejects_config_mismatch(tmp_path):
    model = fresh(r=4)
    with pytest.raises(ValueError, match="r=4.*r=2"):
        save_peft_adapter(model, str(tmp_path), LoRAConfig(r=2, alpha=8, target_modules=["wq"]), to_hf_name=to_hf)
