"""Shared fixtures of the cross-package integration tests: tiny HF checkpoints written once per session."""

import pytest
from archon.testing import hf_model, tiny_hf_config


@pytest.fixture(scope="session")
def dense_model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("qwen3")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def moe_model_dir(tmp_path_factory) -> str:
    # Aux loss off: it is computed per micro-batch / rank, a different function from one whole-batch aux loss.
    d = tmp_path_factory.mktemp("qwen3_moe")
    cfg = tiny_hf_config("qwen3_moe", vocab_size=64, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.0)
    hf_model(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory) -> str:
    """Embedding and LM head share one weight (as in Qwen3-0.6B / 1.7B)."""
    d = tmp_path_factory.mktemp("qwen3_tied")
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2, tie_word_embeddings=True)).save_pretrained(d)
    return str(d)
