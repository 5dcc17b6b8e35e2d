"""`archon rl` on text: the reasoning-gym example runs end to end (shortened), logs the verifier's rewards, and
its export loads in transformers with its tokenizer and generation_config."""

import json
import os

import pytest
import torch
from archon.cli import main
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def test_grpo_reasoning_gym_example_exports_loadable_dir(tmp_path):
    exp = tmp_path / "export"
    rc = main(["rl", "examples/grpo_reasoning_gym.yaml", "--total_train_steps=1", "--rl.batch_size=4",
               "--rl.group_size=2", "--sampling.max_new_tokens=6", "--data.dataset_size=8", "--reward.num_workers=1",
               f"--rl.export_dir={exp}",
               f"--log.dir={tmp_path}", "--log.progress_bar=false"])
    assert rc == 0
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["reward/errors"] == 0 and 0.0 <= row["reward"] <= 1.0
    out = json.load(open(exp / "latest.json"))["path"]
    assert os.path.isfile(os.path.join(out, "READY"))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    gen = GenerationConfig.from_pretrained(out, local_files_only=True)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert model.config.vocab_size >= len(tok)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()


@pytest.mark.parametrize("override, message", [
    ("--data.source=file", "data.source=file needs data.path"),
    ("--data.source=nope", "data.source 'nope' is not one of"),
    ("--reward.num_workers=0", "reward.timeout_s needs reward.num_workers >= 1"),
    ("--reward.on_error=ignore", "reward.on_error raise | zero"),
    ("--data.max_len=10", "data.max_len is not used with data.source=reasoning_gym in archon rl"),
    ("--data.source=synthetic", "data.tokenizer is not used with data.source=synthetic in archon rl"),
])
def test_bad_text_config_is_reported(tmp_path, capsys, override, message):
    assert main(["rl", "examples/grpo_reasoning_gym.yaml", override, f"--log.dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_synthetic_source_rejects_text_keys(tmp_path, capsys):
    assert main(["train", "examples/sft_tiny.yaml", "--data.tokenizer=builtin:qwen3", f"--log.dir={tmp_path}"]) == 2
    assert "data.tokenizer is not used with data.source=synthetic" in capsys.readouterr().err
