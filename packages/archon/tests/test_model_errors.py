"""Bad checkpoints and bad inputs give clear errors and never leave a half-loaded model."""

import archon
import pytest
import torch
from archon.testing import hf_model, tiny_hf_config
from safetensors.torch import load_file, save_file


@pytest.fixture
def hf_dir(tmp_path):
    cfg = tiny_hf_config("qwen3")
    hf_model(cfg).save_pretrained(tmp_path)
    return tmp_path


def _edit(hf_dir, fn):
    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"), r"missing tensor\(s\) \['model.layers.1.self_attn.k_proj.weight'\]"),
        (lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)), "unexpected tensor 'model.layers.0.extra.weight'"),
        (lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(65)), r"shape mismatch for 'norm.weight'.*\[65\].*\[64\]"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_bad_checkpoint_is_rejected_before_loading(hf_dir, edit, message):
    model = archon.from_pretrained(tiny_hf_config("qwen3"), seed=7)
    before = {n: p.clone() for n, p in model.named_parameters()}
    _edit(hf_dir, edit)
    with pytest.raises(ValueError, match=message):
        archon.load_hf_weights(model, hf_dir)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was modified by a failed load"


def test_unsupported_model_type():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*qwen3"):
        archon.from_pretrained(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))


def test_unsupported_rope_scaling():
    cfg = tiny_hf_config("qwen3", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                    "short_factor": [1.0], "long_factor": [1.0]})
    with pytest.raises(ValueError, match="rope scaling type 'longrope' is not supported"):
        archon.from_pretrained(cfg)


def test_bad_inputs():
    model = archon.from_pretrained(tiny_hf_config("qwen3"))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, dtype=torch.long))
    ids = torch.randint(0, 100, (10,))
    with pytest.raises(ValueError, match="ends at 9 but there are 10 tokens"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="must start at 0"):
        model(ids, cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    from archon.models.common.packing import pack_inputs

    with pytest.raises(ValueError, match="hidden states .* need cu_seqlens"):  # a pipeline stage's input
        pack_inputs(torch.randn(10, 64))
