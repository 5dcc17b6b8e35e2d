"""`archon rl` with `sampling.engine=rollout`: the rollout engine samples the same responses as the embedded
sampler (per-sequence seeds), so the run matches the embedded one; bad engine settings are reported."""

import pytest
import torch
from archon.cli import main
from archon.config.fields import load_config
from archon.rl import RLConfig, RLTrainer, RolloutSampler

EXAMPLE = "examples/grpo_tiny.yaml"
BASE = ["--total_train_steps=2", "--rl.sft_warmup_steps=2", "--rl.batch_size=32", "--log.progress_bar=false"]


def test_rollout_engine_run_equals_embedded(tmp_path):
    runs = {}
    for engine in ("embedded", "rollout"):
        cfg = load_config(RLConfig, EXAMPLE, [f"--log.dir={tmp_path / engine}", *BASE, f"--sampling.engine={engine}"])
        trainer = RLTrainer(cfg)
        runs[engine] = (trainer, trainer.run())
    (emb, hist_e), (rol, hist_r) = runs["embedded"], runs["rollout"]
    eng = rol.source.sampler.engine
    assert isinstance(rol.source.sampler, RolloutSampler) and eng.stats["decode_steps"] > 0
    assert eng.release_memory and eng.cache is None  # sampling.release_memory: training got the memory back
    assert [h["gen_slots"] for h in hist_r] == [eng.last_slots] * len(hist_r) and eng.last_slots > 0
    for key in ("reward", "response_len", "stop_frac"):
        assert [h[key] for h in hist_r] == [h[key] for h in hist_e], key
    for (n, p), q in zip(rol.engine.model.named_parameters(), emb.engine.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("override, message", [
    ("--sampling.engine=vllm", "sampling.engine must be one of"),
    ("--sampling.kv_cache_gb=0", "sampling.kv_cache_gb must be > 0"),
    ("--sampling.kv_cache_fraction=2", "sampling.kv_cache_fraction must be in (0, 1]"),
    ("--sampling.kernels=cuda", "sampling.kernels must be one of"),
    ("--sampling.compile_decode=true --sampling.kernels=triton", "are alternatives"),
])
def test_bad_engine_settings_are_reported(tmp_path, capsys, override, message):
    assert main(["rl", EXAMPLE, *override.split(), f"--log.dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_compile_decode_and_cascade_reach_the_engine(tmp_path):
    cfg = load_config(RLConfig, EXAMPLE, [f"--log.dir={tmp_path}", "--sampling.engine=rollout",
                                          "--sampling.compile_decode=false", "--sampling.cascade=false",
                                          "--sampling.kernels=torch", "--sampling.release_memory=false"])
    opts = cfg.sampling.engine_options()
    assert opts["compile_decode"] is False and opts["cascade"] is False
    assert opts["kernels"] == "torch" and opts["release_memory"] is False
