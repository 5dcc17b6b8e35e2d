"""Qwen3-MoE equals HF Qwen3MoeForCausalLM (fp32 logits) and round-trips through HF safetensors."""

import archon
import pytest
import torch
from archon.testing import hf_model, tiny_hf_config

CASES = [
    dict(num_experts=8, num_experts_per_tok=2),
    dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=2),
    dict(num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], num_hidden_layers=3),
]


@pytest.mark.parametrize("kw", CASES, ids=["e8k2", "e16k4-sparse2", "dense-first"])
def test_moe_logits_match_hf(kw, tmp_path):
    cfg = tiny_hf_config("qwen3_moe", **kw)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = archon.from_pretrained(tmp_path).eval()
    dense = [i for i in range(cfg.num_hidden_layers) if not ours.layers[str(i)].moe_enabled]
    expect_dense = [i for i in range(cfg.num_hidden_layers)
                    if i in (cfg.mlp_only_layers or []) or (i + 1) % cfg.decoder_sparse_step]
    assert dense == expect_dense
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-5
    # ours -> HF directory -> transformers
    archon.save_pretrained(ours, tmp_path / "out", max_shard_size="60KB")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                experts_implementation="eager").eval()
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-5
