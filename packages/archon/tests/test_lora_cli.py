"""LoRA through the CLI, against real peft, dense Qwen3 and Qwen3-MoE (attention LoRA + expert LoRA):

- `archon train` (LoRA, checkpoint) -> `archon export-adapter` -> `peft.PeftModel` gives the logits of the
  trained model, and of `archon export-hf --merge-lora` loaded in transformers;
- peft's own adapter (`target_parameters` on the fused experts) -> `archon train --actor.lora.adapter_path`
  (lr 0) -> `export-hf --merge-lora` / `export-adapter` give peft's logits.
fp32, max logit difference <= 1e-5 everywhere; exported files are 0644 (umask 022).
"""

import os
import stat

import pytest
import torch
import yaml
from archon.cli import main
from archon.export_adapter import actor_from_run_config, load_lora_checkpoint
from archon.testing import hf_model, tiny_hf_config

VOCAB = 16  # the synthetic digit tasks' vocabulary
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


def _run_yaml(tmp, model_dir: str, moe: bool) -> str:
    cfg = {"allocation_mode": "archon:d1", "total_train_steps": 2, "device": "cpu",
           "actor": {"path": model_dir, "dtype": "float32", "mb_max_tokens": 4096, "seed": 2,
                     "optimizer": {"lr": 0.05, "warmup_steps_proportion": 0.0},
                     "lora": {"enabled": True, "r": 2, "alpha": 5.0, "use_rslora": True,
                              "target_modules": ["q_proj", "v_proj", "o_proj"], "expert_lora": moe}},
           "data": {"task": "reverse", "num_digits": 3, "batch_size": 4},
           "checkpoint": {"dir": str(tmp / "ckpt")},
           "log": {"dir": str(tmp / "run"), "progress_bar": False}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _logits(model_or_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, str):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.eval()(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def _peft(model_dir: str, adapter: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter)


def _assert_user_files(d: str) -> None:
    for name in os.listdir(d):
        assert stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode) == 0o644, name


@pytest.fixture(autouse=True)
def _umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3_moe"])
def test_archon_adapter_to_peft_through_cli(tmp_path, moe):
    model_dir = str(tmp_path / "base")
    hf_model(tiny_hf_config("qwen3_moe" if moe else "qwen3", vocab_size=VOCAB)).save_pretrained(model_dir)
    run = _run_yaml(tmp_path, model_dir, moe)
    assert main(["train", run]) == 0
    assert main(["export-adapter", str(tmp_path / "ckpt"), str(tmp_path / "adapter"), "--config", run]) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "merged"), "--merge-lora", "--config", run,
                 "--dtype", "float32"]) == 0
    trained = _logits(load_lora_checkpoint(str(tmp_path / "ckpt"), actor_from_run_config(run, [])).model)
    peft_model = _peft(model_dir, str(tmp_path / "adapter"))
    if moe:  # the experts carry LoRA in peft's target_parameters form
        assert sorted(peft_model.peft_config["default"].target_parameters) == sorted(
            f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert (_logits(peft_model) - trained).abs().max().item() <= 1e-5
    assert (_logits(str(tmp_path / "merged")) - trained).abs().max().item() <= 1e-5
    assert (_logits(model_dir) - trained).abs().max().item() > 1e-3, "training must have changed the adapter"
    if moe:  # the expert LoRA alone must matter too: drop it and the logits move
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "experts" in name and "lora_B" in name:
                    p.zero_()
        assert (_logits(peft_model) - trained).abs().max().item() > 1e-4
    _assert_user_files(str(tmp_path / "adapter"))
    _assert_user_files(str(tmp_path / "merged"))


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3_moe"])
def test_peft_adapter_to_archon_through_cli(tmp_path, moe):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = str(tmp_path / "base")
    hf_model(tiny_hf_config("qwen3_moe" if moe else "qwen3", vocab_size=VOCAB)).save_pretrained(model_dir)
    lcfg = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=False,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lcfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    want = _logits(peft_model)

    run = _run_yaml(tmp_path, model_dir, moe)
    start = f"--actor.lora.adapter_path={tmp_path / 'peft'}"  # the run's overrides go to the exports too
    assert main(["train", run, start, "--actor.optimizer.lr=0", "--total_train_steps=1"]) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "merged"), "--merge-lora", "--config", run,
                 "--dtype", "float32", start]) == 0
    assert main(["export-adapter", str(tmp_path / "ckpt"), str(tmp_path / "adapter"), "--config", run, start]) == 0
    assert (_logits(str(tmp_path / "merged")) - want).abs().max().item() <= 1e-5
    assert (_logits(_peft(model_dir, str(tmp_path / "adapter"))) - want).abs().max().item() <= 1e-5
    assert (_logits(model_dir) - want).abs().max().item() > 1e-3


def test_export_adapter_errors(tmp_path, capsys):
    model_dir = str(tmp_path / "base")
    hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB)).save_pretrained(model_dir)
    run = _run_yaml(tmp_path, model_dir, False)
    assert main(["export-adapter", str(tmp_path / "nothing"), str(tmp_path / "out"), "--config", run]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert main(["export-adapter", str(tmp_path / "nothing"), str(tmp_path / "out"), "--config", run,
                 "--actor.lora.enabled=false"]) == 2
    assert "actor.lora.enabled is false" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "nothing"), str(tmp_path / "out"), "--merge-lora"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_lora_exports_never_replace_what_they_did_not_write(tmp_path, capsys):
    """export-adapter and export-hf --merge-lora refuse a non-empty target and the checkpoint itself; nothing changes."""
    from archon.cli import main

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    (ckpt / "keep.txt").write_text("mine")
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    for args, why in ((["export-adapter", str(ckpt), str(out), "--config", "x.yaml"], "is not empty"),
                      (["export-hf", str(ckpt), str(out), "--merge-lora", "--config", "x.yaml"], "is not empty"),
                      (["export-adapter", str(ckpt), str(ckpt), "--config", "x.yaml"], "is the checkpoint")):
        assert main(args) == 2
        assert why in capsys.readouterr().err  # refused for the target, before the (missing) run config is read
    assert (out / "notes.txt").read_text() == "user data" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["keep.txt"]
