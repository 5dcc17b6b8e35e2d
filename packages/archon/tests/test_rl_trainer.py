"""`archon rl`: the GRPO example learns, bad configs fail clearly, runs are reproducible, weight export
and weight callbacks carry the version, and the reward loader accepts both path forms."""

import json
import os

import archon
import pytest
import torch
from archon.cli import main
from archon.config.fields import load_config
from archon.rl import RLConfig, RLTrainer, load_reward_fn, run_rl

EXAMPLE = "examples/grpo_tiny.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(RLConfig, EXAMPLE, [f"--log.dir={tmp_path}", "--log.progress_bar=false", *overrides])


def test_grpo_example_learns(tmp_path):
    """The example, shortened: after the documented SFT warm start, GRPO raises the mean reward."""
    steps = 24
    history = run_rl(_cfg(tmp_path, f"--total_train_steps={steps}"))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == steps and rows[-1]["step"] == steps
    for key in ("reward", "kl", "clip_frac", "entropy", "response_len", "tokens_per_s", "grad_norm", "version"):
        assert key in rows[-1], key
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-4:]) / 4
    assert last > first + 0.15, (first, last)
    assert rows[-1]["version"] == 20 + steps * 2  # sft warmup steps + n_minibatches optimizer steps per RL step


@pytest.mark.parametrize("override, message", [
    ("--rl.group_size=5", "rl.group_size 5 must divide rl.batch_size 128"),
    ("--rl.eps_clip=-0.1", "eps_clip must be > 0"),
    ("--rl.estimator=ppo2", "unknown advantage estimator 'ppo2'"),
    ("--rl.kl_estimator=k9", "unknown KL estimator 'k9'"),
    ("--rl.n_minibatches=0", "rl.n_minibatches must be in"),
    ("--sampling.top_p=1.5", "sampling: sampling top_p must be in"),
    ("--reward.fn=", "reward.fn is empty"),
    ("--rl.export_every_n_steps=2", "rl.export_every_n_steps needs rl.export_dir"),
])
def test_bad_rl_config_is_reported(tmp_path, capsys, override, message):
    assert main(["rl", EXAMPLE, override, f"--log.dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_reward_fn_import_forms():
    for spec in ("examples.rewards:digit_reward", "examples/rewards.py:digit_reward"):
        fn = load_reward_fn(spec)
        assert fn([1, 4, 5, 6, 2], [6, 5, 4, 3]) == 1.0  # reverse of 0 1 2, then eos
        assert fn([1, 4, 5, 6, 2], [6, 9, 4, 4, 4]) == pytest.approx(2 / 5)  # too long: divided by 5
    for spec, msg in [("examples.rewards", "must look like"), ("examples.rewards:nope", "no function 'nope'"),
                      ("no_such_pkg.mod:f", "cannot import")]:
        with pytest.raises(ValueError, match=msg):
            load_reward_fn(spec)


def test_reproducible_export_and_weight_callbacks(tmp_path):
    """Two identical runs give bitwise-equal weights, although one also exports and syncs weights."""
    base = ["--total_train_steps=3", "--rl.sft_warmup_steps=2", "--rl.batch_size=32"]
    seen = []

    def callback(state_dict, version):
        seen.append((version, {k: v.clone() for k, v in state_dict.items()}))

    a = RLTrainer(_cfg(tmp_path / "a", *base, f"--rl.export_dir={tmp_path / 'exp'}", "--rl.export_every_n_steps=2",
                       "--rl.export_dtype=float32"), weight_callbacks=[callback])
    hist_a = a.run()
    b = RLTrainer(_cfg(tmp_path / "b", *base))
    hist_b = b.run()
    assert [h["reward"] for h in hist_a] == [h["reward"] for h in hist_b]
    for (n, p), q in zip(a.engine.model.named_parameters(), b.engine.model.parameters()):
        assert torch.equal(p, q), n
    assert [v for v, _ in seen] == [4, 6, 8]  # 2 warmup steps, then 2 minibatches per RL step
    for k, v in a.engine.model.state_dict().items():
        assert torch.equal(seen[-1][1][k], v), k
    exported = sorted(os.listdir(tmp_path / "exp"))
    assert exported == ["latest.json", "v000006", "v000008"]
    assert json.loads((tmp_path / "exp" / "v000008" / "READY").read_text())["version"] == 8
    assert json.loads((tmp_path / "exp" / "latest.json").read_text())["version"] == 8
    reloaded = archon.from_pretrained(str(tmp_path / "exp" / "v000008"))
    for (n, p), q in zip(reloaded.named_parameters(), a.engine.model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("mode", ["sparse", "dta"])
def test_rl_tree_modes_equal_flat(tmp_path, mode):
    """A GRPO group shares its prompt: PPO (and the SFT warm start) through a tree mode trains like flat packing.
    Same seeds give the same rollouts; losses, grad norms and the weights after the steps agree to fp32 noise."""
    base = ["--total_train_steps=2", "--rl.sft_warmup_steps=1", "--rl.batch_size=32"]
    flat = RLTrainer(_cfg(tmp_path / "flat", *base))
    hist_flat = flat.run()
    tree = RLTrainer(_cfg(tmp_path / mode, *base, f"--actor.archon.tree_training_mode={mode}",
                          "--actor.archon.tree_dta_block_size=3"))
    hist_tree = tree.run()
    assert [h["reward"] for h in hist_flat] == [h["reward"] for h in hist_tree]  # same rollouts
    assert hist_tree[-1]["tree_compression"] > 1.5  # the groups' prompts are shared
    for a, b in zip(hist_flat, hist_tree):
        for k in ("loss", "grad_norm", "clip_frac"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    # Adam turns fp32 noise in near-zero gradients into update noise of up to lr (2e-3) per step; a wrong gradient
    # moves many entries by about lr, so 1% of lr over the 5 updates separates the two.
    for (n, p), q in zip(flat.engine.model.named_parameters(), tree.engine.model.parameters()):
        assert float((p - q).abs().max()) <= 2e-5, n
