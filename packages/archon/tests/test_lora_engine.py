"""LoRA in the engine (one process): adapters load in peft with equal logits, merged export loads in transformers,
only trainable params are optimised, and a saved adapter resumes through actor.lora.adapter_path."""

import json
import os

import pytest
import torch
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens

VOCAB = 64


def _batch(step: int) -> PackedBatch:
    g = torch.Generator().manual_seed(10 + step)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 17, 5, 12)]
    return PackedBatch.from_sequences(seqs, [[1.0] * len(s) for s in seqs])


def _engine(model_dir: str, **lora) -> ArchonEngine:
    actor = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=64, seed=3)
    actor.optimizer.lr = 2e-2
    actor.lora.enabled = True
    actor.lora.r = 4
    actor.lora.alpha = 8.0
    for k, v in lora.items():
        setattr(actor.lora, k, v)
    return ArchonEngine(actor, total_steps=3, device="cpu").initialize()


def _train(eng: ArchonEngine, steps: int = 2) -> None:
    for s in range(steps):
        eng.train_batch(_batch(s), sft_loss, target_tokens)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB)).save_pretrained(d)
    return str(d)


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def test_adapter_loads_in_peft_with_equal_logits(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    eng = _engine(model_dir, use_rslora=True, modules_to_save=["lm_head"])
    base_params = {n: p.detach().clone() for n, p in eng.model.named_parameters() if not p.requires_grad}
    _train(eng)
    assert all(torch.equal(p, base_params[n]) for n, p in eng.model.named_parameters() if not p.requires_grad)
    eng.save_adapter(str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    assert cfg["use_rslora"] and cfg["modules_to_save"] == ["lm_head"]

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
        got = eng.model.eval()(IDS)
    assert (got - want).abs().max().item() <= 1e-5
    with torch.no_grad(), peft_model.disable_adapter():
        untrained = peft_model(input_ids=IDS).logits
    assert (untrained - want).abs().max().item() > 1e-3, "the adapter must have changed the model"


def test_only_trainable_params_in_optimizer_and_merged_export(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    eng = _engine(model_dir, target_modules=["wq", "v_proj", "w2"])  # native and HF names mixed
    trainable = {id(p) for p in eng.model.parameters() if p.requires_grad}
    in_opt = {id(p) for g in eng.optimizer.param_groups for p in g["params"]}
    assert in_opt == trainable and len(trainable) == 2 * 3 * 2  # A/B x 3 targets x 2 layers
    _train(eng)
    eng.export_weights(str(tmp_path / "merged"), dtype=torch.float32, merged=True)
    assert json.loads((tmp_path / "merged" / "READY").read_text())["version"] == 2
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = eng.model.eval()(IDS)
        got = ref(input_ids=IDS).logits
    assert (got - want).abs().max().item() <= 1e-5

    eng.export_weights(str(tmp_path / "adapter"), merged=False)
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    assert os.path.exists(tmp_path / "adapter" / "READY")


def test_adapter_path_resumes_the_adapter(model_dir, tmp_path):
    eng = _engine(model_dir, target_modules=["q_proj", "down_proj"], alpha=4.0)
    _train(eng)
    eng.save_adapter(str(tmp_path / "a"))
    again = _engine(model_dir, target_modules=["q_proj", "down_proj"], alpha=4.0, adapter_path=str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(eng.model.eval()(IDS), again.model.eval()(IDS))
    fresh = _engine(model_dir, target_modules=["q_proj", "down_proj"], alpha=4.0)
    with torch.no_grad():
        assert not torch.allclose(eng.model.eval()(IDS), fresh.model.eval()(IDS))


def test_bad_lora_config_errors(model_dir):
    with pytest.raises(ValueError, match="match no module"):
        _engine(model_dir, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="rank r"):
        _engine(model_dir, r=0)
    eng = ArchonEngine(ActorConfig(path=model_dir, dtype="float32"), device="cpu").initialize()
    with pytest.raises(ValueError, match="lora.enabled"):
        eng.save_adapter("/tmp/never")


def test_sampler_state_dict_is_merged(model_dir):
    from archon.hf import build_model, load_hf_config

    eng = _engine(model_dir, target_modules=["q_proj", "up_proj"])
    _train(eng)
    sd = eng.state_dict_for_sampler()
    plain = build_model(load_hf_config(model_dir), device="cpu")
    plain.init_buffers()
    plain.load_state_dict(sd)  # strict: base keys only, no LoRA factors
    with torch.no_grad():
        assert (plain.eval()(IDS) - eng.model.eval()(IDS)).abs().max().item() <= 1e-5


def test_tied_model_with_saved_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM

    d = str(tmp_path / "tied")
    hf = hf_model(tiny_hf_config("qwen3", vocab_size=VOCAB, tie_word_embeddings=True))
    hf.save_pretrained(d)
    eng = _engine(d, target_modules=["v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():  # the lm_head copy starts from the tied embedding
        assert (eng.model.eval()(IDS) - hf(input_ids=IDS).logits).abs().max().item() <= 1e-5
    _train(eng)
    assert not torch.equal(eng.model.output.weight, eng.model.tok_embeddings.weight)
    eng.export_weights(str(tmp_path / "merged"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(input_ids=IDS).logits - eng.model.eval()(IDS)).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_cuda_bf16_compiled_matches_cpu_fp32(model_dir, tmp_path):
    """CUDA path (bf16, torch.compile per block, varlen attention): step losses track the fp32 CPU run within bf16
    tolerance and the adapter saves."""
    from safetensors.torch import load_file

    def run(device: str, dtype: str, out: str) -> list[float]:
        actor = ActorConfig(path=model_dir, dtype=dtype, mb_max_tokens=64, seed=3)
        actor.optimizer.lr = 1e-3
        actor.lora.enabled, actor.lora.r, actor.lora.alpha = True, 4, 8.0
        actor.archon.enable_compile = device == "cuda"
        eng = ArchonEngine(actor, total_steps=3, device=device).initialize()
        losses = [eng.train_batch(_batch(s), sft_loss, target_tokens)["loss"] for s in range(3)]
        eng.save_adapter(out)
        return losses

    want = run("cpu", "float32", str(tmp_path / "cpu"))
    got = run("cuda", "bfloat16", str(tmp_path / "cuda"))
    for a, b in zip(want, got):
        assert abs(a - b) <= 2e-2 * abs(a), (want, got)
    # Adam turns bf16 noise in near-zero grads into +-lr flips, so the factors are checked for shape, not value.
    ref, out = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("cpu", "cuda"))
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in out.items()}
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in out.values())
