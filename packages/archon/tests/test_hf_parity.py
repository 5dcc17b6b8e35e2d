"""Archon models equal HF transformers (fp32 logits) for qwen2/qwen3 and round-trip through HF formats."""

import json
import os

import archon
import pytest
import torch
from archon.testing import hf_model, tiny_hf_config

CASES = [
    ("qwen2", dict()),
    ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=97)),
    ("qwen3", dict()),
    ("qwen3", dict(num_key_value_heads=1, head_dim=40)),
    ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True, vocab_size=151)),
    ("qwen3", dict(attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4})),
    ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                    "original_max_position_embeddings": 64})),
    ("qwen2", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
]


def _ids(name_kw):
    return f"{name_kw[0]}-" + "-".join(f"{k}" for k in name_kw[1]) if name_kw[1] else name_kw[0]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_logits_match_hf_batched_and_packed(case, tmp_path):
    model_type, kw = case
    cfg = tiny_hf_config(model_type, **kw)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = archon.from_pretrained(tmp_path).eval()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, 37), generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5

    # Packed: documents of very different lengths (incl. length 1) in one row, each compared to HF alone.
    lengths = [1, 29, 5, 64, 2]
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(docs)[None], cu_seqlens=cu)
        for i, d in enumerate(docs):
            want_i = ref(input_ids=d[None]).logits[0]
            got_i = packed[0, cu[i]:cu[i + 1]]
            assert (got_i - want_i).abs().max().item() <= 1e-5, f"document {i}"


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_save_pretrained_loads_in_transformers(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(model_type, tie_word_embeddings=(model_type == "qwen2"))
    ours = archon.from_pretrained(cfg, seed=3).eval()
    archon.save_pretrained(ours, tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max().item() <= 1e-5
    back = archon.from_pretrained(tmp_path / "out").eval()
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_sharded_index_directories(tmp_path):
    cfg = tiny_hf_config("qwen3")
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = archon.from_pretrained(tmp_path / "hf").eval()
    archon.save_pretrained(ours, tmp_path / "ours", max_shard_size="40KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_attention_runs_in_autocast_dtype():
    """Under bf16 autocast the attention kernel must see bf16 q/k/v (fp32 RoPE tables must not promote q/k:
    the varlen backend would fall back to its dense fp32 path)."""
    model = archon.from_pretrained(tiny_hf_config("qwen3"))
    seen = []
    inner = model.attn_backend

    def spy(q, k, v, meta, scale=None):
        seen.append((q.dtype, k.dtype, v.dtype))
        return inner(q, k, v, meta, scale=scale)

    model.set_attention_backend(spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 100, (1, 9)))
    assert seen and all(dt == (torch.bfloat16,) * 3 for dt in seen), seen
