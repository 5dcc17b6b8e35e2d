"""Config loading, overrides (AReaL forms too), --help, and the SFT example learning on CPU."""

import json
import subprocess
import sys

import pytest
from archon.cli import main
from archon.config.fields import load_config
from archon.config.schema import TrainConfig


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_both_override_forms(tmp_path):
    path = _yaml(tmp_path, "allocation_mode: archon:d2\nactor:\n  path: x\n  archon:\n    ac_mode: selective\n")
    cfg = load_config(TrainConfig, path, ["--actor.archon.ac_mode=full", "+actor.archon.ac_memory_budget=0.3",
                                          "--actor.gradient_checkpointing=true", "--total_train_steps=7"])
    assert cfg.allocation_mode == "archon:d2"
    assert cfg.actor.archon.ac_mode == "full" and cfg.actor.archon.ac_memory_budget == 0.3
    assert cfg.actor.gradient_checkpointing is True and cfg.total_train_steps == 7
    assert cfg.actor.path == "x" and cfg.actor.optimizer.lr == 1e-5  # defaults kept


@pytest.mark.parametrize("text, overrides, message", [
    ("actor:\n  pathh: x\n", [], "unknown config key 'actor.pathh'"),
    ("", ["--actor.archon.no_such=1"], "unknown config key 'actor.archon.no_such'"),
    ("total_train_steps: ten\n", [], "config key 'total_train_steps': expected an integer"),
    ("actor:\n  gradient_checkpointing: 3\n", [], "config key 'actor.gradient_checkpointing': expected true/false"),
    ("actor: 5\n", [], "config key 'actor': expected a mapping"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, _yaml(tmp_path, text), overrides)


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", _yaml(tmp_path, "actor:\n  pathh: x\n")]) == 2
    assert "unknown config key 'actor.pathh'" in capsys.readouterr().err


def test_help_lists_every_field():
    out = subprocess.run([sys.executable, "-m", "archon", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key in ["allocation_mode", "actor.path", "actor.gradient_checkpointing", "actor.archon.enable_compile",
                "actor.archon.ac_mode", "actor.archon.ac_memory_budget", "actor.archon.ac_debug",
                "actor.archon.pp_schedule", "actor.archon.offload_params", "actor.optimizer.lr", "data.task"]:
        assert key in out, key
    assert "(default: 'none')" in out


def test_sft_example_learns_reverse(tmp_path):
    """The CLI example (shortened) drives the loss down clearly on CPU."""
    from archon.train import run_train

    cfg = load_config(TrainConfig, "examples/sft_tiny.yaml",
                      ["--total_train_steps=45", f"--log.dir={tmp_path}", "--log.progress_bar=false"])
    history = run_train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 45 and rows[-1]["step"] == 45
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_gb"):
        assert key in rows[-1]
