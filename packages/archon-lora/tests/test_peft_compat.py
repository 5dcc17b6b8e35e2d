"""Our LoRA against real peft on a tiny HF Qwen3: adapter round trips both ways and merged weights."""

import copy

import pytest
import torch
from archon_lora import (
    LoRAConfig,
    inject_lora,
    load_peft_adapter,
    lora_modules,
    merge_lora,
    merged_state_dict,
    read_peft_config,
    save_peft_adapter,
    unmerge_lora,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
identity = lambda name: name


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                      attn_implementation="eager")
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base() -> Qwen3ForCausalLM:
    return tiny_qwen3()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def randomize(model: torch.nn.Module, head: bool, seed: int = 2) -> None:
    """Non-zero B (and a changed lm_head copy) so that a broken save/load cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
        if head:
            model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.05)


CASES = [
    pytest.param(LoRAConfig(r=4, alpha=8, target_modules=TARGETS), id="alpha_ne_r"),
    pytest.param(LoRAConfig(r=4, alpha=6, use_rslora=True, target_modules=TARGETS, modules_to_save=["lm_head"]),
                 id="rslora_head"),
]


@pytest.mark.parametrize("cfg", CASES)
def test_ours_to_peft(base, ids, cfg, tmp_path):
    ours = inject_lora(copy.deepcopy(base), cfg)
    randomize(ours, head=bool(cfg.modules_to_save))
    save_peft_adapter(ours, str(tmp_path), cfg, to_hf_name=identity)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        ref = peft_model(ids).logits
        out = ours(ids).logits
        plain = base(ids).logits
    assert (out - plain).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _peft_adapter(base, r, alpha, rslora, modules_to_save=None, seed=4):
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                     modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_to_ours_and_merge(base, ids, rslora, tmp_path):
    pm = _peft_adapter(base, r=4, alpha=12, rslora=rslora, modules_to_save=["lm_head"] if rslora else None)
    pm.save_pretrained(str(tmp_path))
    if rslora:
        cfg = read_peft_config(str(tmp_path))
        assert (cfg.r, cfg.alpha, cfg.use_rslora) == (4, 12, True)
        assert sorted(cfg.target_modules) == sorted(TARGETS) and cfg.modules_to_save == ["lm_head"]
    else:  # inject with the wrong alpha on purpose: loading takes alpha / rsLoRA from the adapter config
        cfg = LoRAConfig(r=4, alpha=1, target_modules=TARGETS)
    ours = inject_lora(copy.deepcopy(base), cfg)
    load_peft_adapter(ours, str(tmp_path), from_hf_name=identity)
    with torch.no_grad():
        ref = pm(ids).logits
        out = ours(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    merged_ref = pm.merge_and_unload().state_dict()
    merged_ours = merged_state_dict(ours)
    assert set(merged_ours) == set(merged_ref)
    for k, v in merged_ref.items():
        torch.testing.assert_close(merged_ours[k], v, rtol=1e-5, atol=1e-6, msg=k)

    before = copy.deepcopy(ours.state_dict())
    merge_lora(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-5, atol=1e-5)
    for k, v in ours.state_dict().items():
        if k in merged_ref:
            torch.testing.assert_close(v, merged_ref[k], rtol=1e-5, atol=1e-6, msg=k)
    unmerge_lora(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
