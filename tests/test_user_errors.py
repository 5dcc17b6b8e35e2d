"""Every user mistake ends in one line `archon: error: ...` naming the culprit, exit code 2, no traceback, and
nothing on disk changed. The CLI runs in-process (one torch import for all cases)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
from archon.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_qwen3" / "config.json")
BASE = f"""\
total_train_steps: 1
device: cpu
actor:
  path: {TINY}
  dtype: float32
  mb_max_tokens: 256
data:
  batch_size: 2
  num_digits: 2
log:
  dir: run
  progress_bar: false
"""
RL_BASE = f"""\
total_train_steps: 1
device: cpu
actor:
  path: {TINY}
  dtype: float32
rl:
  batch_size: 4
  group_size: 2
sampling:
  max_new_tokens: 2
reward:
  fn: rewards.py:good
log:
  dir: run
  progress_bar: false
"""
REWARDS = "def good(p, r, **f):\n    return 1.0\n"


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns,
                                             None if p.is_dir() else p.read_bytes())
    return out


def cli_error(args: list[str], root: Path, capsys) -> tuple[int, str]:
    """Run the CLI; assert one `archon: error:` line, no traceback and an unchanged `root`."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert snapshot(root) == before, "the failed command changed files"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("archon:")]
    assert len(lines) == 1 and lines[0].startswith("archon: error: "), err
    return code, lines[0]


def _files(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


# (case id, files to create, argv, text the message must contain)
TRAIN = [
    ("missing-config", {}, ["train", "nope.yaml"], "nope.yaml: No such file"),
    ("config-is-dir", {"d/x": ""}, ["train", "d"], "d: is a directory"),
    ("yaml-syntax", {"c.yaml": "actor:\n  path: [1, 2\n"}, ["train", "c.yaml"], "c.yaml line 3"),
    ("yaml-tab", {"c.yaml": "actor:\n\tpath: x\n"}, ["train", "c.yaml"], "c.yaml line 2"),
    ("top-level-list", {"c.yaml": "- 1\n"}, ["train", "c.yaml"], "top level must be a mapping"),
    ("unknown-key", {"c.yaml": BASE + "actr: {}\n"}, ["train", "c.yaml"], "unknown config key 'actr'"),
    ("unknown-nested", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.pathh=x"], "'actor.pathh'"),
    ("int-type", {"c.yaml": BASE}, ["train", "c.yaml", "--total_train_steps=ten"], "'total_train_steps'"),
    ("bool-type", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.init_from_scratch=3"], "'actor.init_from_scratch'"),
    ("float-type", {"c.yaml": BASE}, ["train", "c.yaml", "+actor.optimizer.lr=fast"], "'actor.optimizer.lr'"),
    ("section-scalar", {"c.yaml": BASE}, ["train", "c.yaml", "--actor=5"], "'actor'"),
    ("override-no-eq", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.path"], "'--actor.path'"),
    ("override-into-value", {"c.yaml": BASE}, ["train", "c.yaml", "--total_train_steps.x=1"],
     "'total_train_steps' is not a section"),
    ("negative-steps", {"c.yaml": BASE}, ["train", "c.yaml", "--total_train_steps=-5"], "total_train_steps"),
    ("zero-steps", {"c.yaml": BASE}, ["train", "c.yaml", "--total_train_steps=0"], "total_train_steps"),
    ("bad-device", {"c.yaml": BASE}, ["train", "c.yaml", "--device=tpu"], "device 'tpu'"),
    ("bad-dtype", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.dtype=int8"], "actor.dtype 'int8'"),
    ("zero-budget", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.mb_max_tokens=0"], "actor.mb_max_tokens"),
    ("negative-lr", {"c.yaml": BASE}, ["train", "c.yaml", "+actor.optimizer.lr=-1e-3"], "actor.optimizer.lr"),
    ("nan-lr", {"c.yaml": BASE}, ["train", "c.yaml", "+actor.optimizer.lr=nan"], "actor.optimizer.lr"),
    ("beta-one", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.optimizer.beta2=1"], "actor.optimizer.beta2"),
    ("eps-zero", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.optimizer.eps=0"], "actor.optimizer.eps"),
    ("bad-schedule", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.optimizer.lr_scheduler_type=step"],
     "lr_scheduler_type 'step'"),
    ("warmup-over-one", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.optimizer.warmup_steps_proportion=1.5"],
     "warmup_steps_proportion"),
    ("resume-word", {"c.yaml": BASE}, ["train", "c.yaml", "--checkpoint.dir=ck", "--checkpoint.resume=latest"],
     "checkpoint.resume must be none, auto or a step number"),
    ("resume-negative", {"c.yaml": BASE}, ["train", "c.yaml", "--checkpoint.dir=ck", "--checkpoint.resume=-3"],
     "checkpoint.resume step"),
    ("resume-no-dir", {"c.yaml": BASE}, ["train", "c.yaml", "--checkpoint.resume=auto"], "needs checkpoint.dir"),
    ("every-no-dir", {"c.yaml": BASE}, ["train", "c.yaml", "--checkpoint.every_n_steps=5"],
     "every_n_steps needs checkpoint.dir"),
    ("ckpt-dir-is-file", {"c.yaml": BASE, "f": "x"}, ["train", "c.yaml", "--checkpoint.dir=f"],
     "checkpoint.dir 'f' is a file"),
    ("batch-zero", {"c.yaml": BASE}, ["train", "c.yaml", "--data.batch_size=0"], "data.batch_size"),
    ("jsonl-no-path", {"c.yaml": BASE}, ["train", "c.yaml", "--data.task=jsonl"], "data.task=jsonl needs data.path"),
    ("jsonl-missing", {"c.yaml": BASE}, ["train", "c.yaml", "--data.task=jsonl", "--data.path=d.jsonl"],
     "data.path 'd.jsonl' is not a file"),
    ("jsonl-syntax", {"c.yaml": BASE, "d.jsonl": '{"input_ids": [1, 2]}\n{"input_ids": [1,\n'},
     ["train", "c.yaml", "--data.task=jsonl", "--data.path=d.jsonl"], "d.jsonl line 2"),
    ("jsonl-no-ids", {"c.yaml": BASE, "d.jsonl": '{"input_ids": [1, 2]}\n{"ids": [1]}\n'},
     ["train", "c.yaml", "--data.task=jsonl", "--data.path=d.jsonl"], "d.jsonl:2: missing 'input_ids'"),
    ("jsonl-too-few", {"c.yaml": BASE, "d.jsonl": '{"input_ids": [1, 2]}\n'},
     ["train", "c.yaml", "--data.task=jsonl", "--data.path=d.jsonl"], "fewer than data.batch_size=2"),
    ("jsonl-out-of-vocab", {"c.yaml": BASE, "d.jsonl": '{"input_ids": [1, 99]}\n{"input_ids": [1, 2]}\n'},
     ["train", "c.yaml", "--data.task=jsonl", "--data.path=d.jsonl"], "token id 99 is outside"),
    ("model-missing", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.path=nomodel"], "actor.path 'nomodel' does not"),
    ("model-no-config", {"c.yaml": BASE, "m/x.txt": ""}, ["train", "c.yaml", "--actor.path=m"], "has no config.json"),
    ("model-bin-only", {"c.yaml": BASE, "m/config.json": "{}", "m/pytorch_model.bin": b"\0"},
     ["train", "c.yaml", "--actor.path=m"], "pytorch_model.bin but no *.safetensors"),
    ("model-bad-json", {"c.yaml": BASE, "m/config.json": '{"model_type": "qwen3",\n "hidden_size": }'},
     ["train", "c.yaml", "--actor.path=m/config.json"], "config.json line 2"),
    ("model-unknown-type", {"c.yaml": BASE, "m/config.json": '{"model_type": "llama9"}'},
     ["train", "c.yaml", "--actor.path=m/config.json"], "config.json: transformers cannot read"),
    ("model-no-type", {"c.yaml": BASE, "m/config.json": '{"hidden_size": 8}'},
     ["train", "c.yaml", "--actor.path=m/config.json"], "not an HF model config"),
    ("adapter-missing", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.lora.enabled=true",
                                            "--actor.lora.adapter_path=ad"], "adapter_path 'ad'"),
    ("skips-zero", {"c.yaml": BASE}, ["train", "c.yaml", "--max_skipped_steps=0"], "max_skipped_steps"),
    ("timeout-zero", {"c.yaml": BASE}, ["train", "c.yaml", "--distributed.timeout_s=0"], "distributed.timeout_s"),
    ("allocation-grammar", {"c.yaml": BASE}, ["train", "c.yaml", "--allocation_mode=archon:d2q"], "archon:d2q"),
    ("allocation-size", {"c.yaml": BASE}, ["train", "c.yaml", "--allocation_mode=archon:d4"], "4"),
    ("ac-mode", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.archon.ac_mode=most"], "actor.archon.ac_mode 'most'"),
    ("cpp-wrapper-no-compile", {"c.yaml": BASE}, ["train", "c.yaml", "--actor.archon.compile_cpp_wrapper=true"],
     "compile-cpp-wrapper-needs-compile"),
    ("strict-warning", {"c.yaml": BASE, "m/config.json": open(TINY).read()},
     ["train", "c.yaml", "--actor.path=m", "--strict"], "no weights: the model starts from random init"),
]

RL = [
    ("rl-reward-empty", {"c.yaml": RL_BASE}, ["rl", "c.yaml", "--reward.fn="], "reward.fn is empty"),
    ("rl-reward-module", {"c.yaml": RL_BASE}, ["rl", "c.yaml", "--reward.fn=no_such_mod:f"], "reward.fn 'no_such_mod:f'"),
    ("rl-reward-function", {"c.yaml": RL_BASE, "rewards.py": REWARDS}, ["rl", "c.yaml", "--reward.fn=rewards.py:bad"],
     "has no function 'bad'"),
    ("rl-group", {"c.yaml": RL_BASE, "rewards.py": REWARDS}, ["rl", "c.yaml", "--rl.group_size=3"],
     "rl.group_size 3 must divide"),
    ("rl-prompt-too-long", {"c.yaml": RL_BASE, "rewards.py": REWARDS, "p.jsonl": '{"prompt_ids": %s}\n' % ([1] * 300)},
     ["rl", "c.yaml", "--data.task=jsonl", "--data.path=p.jsonl"], "a prompt of 300 tokens"),
    ("rl-prompts-syntax", {"c.yaml": RL_BASE, "rewards.py": REWARDS, "p.jsonl": '{"prompt_ids": [1, 2]\n'},
     ["rl", "c.yaml", "--data.task=jsonl", "--data.path=p.jsonl"], "p.jsonl line 1"),
]


@pytest.mark.parametrize("files, argv, needle", [c[1:] for c in TRAIN + RL], ids=[c[0] for c in TRAIN + RL])
def test_user_error(tmp_path, monkeypatch, capsys, files, argv, needle):
    if "--device=cuda" in argv and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.chdir(tmp_path)
    _files(tmp_path, files)
    code, line = cli_error(argv, tmp_path, capsys)
    assert needle in line, line
    assert code == 2, line


def test_cuda_without_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _files(tmp_path, {"c.yaml": BASE})
    code, line = cli_error(["train", "c.yaml", "--device=cuda"], tmp_path, capsys)
    assert code == 2 and "device=cuda but no CUDA GPU" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "nope.yaml", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "archon: error: nope.yaml" in err


def test_documented_forms_are_accepted(tmp_path):
    """`+actor.optimizer.lr=1e-3` (YAML 1.1 reads it as a string), `lr: 1e-3` in a file, `checkpoint.resume: 7`."""
    from archon.config.checks import check_config
    from archon.config.fields import load_config
    from archon.config.schema import TrainConfig

    p = tmp_path / "c.yaml"
    p.write_text(BASE + "checkpoint:\n  dir: ck\n  resume: 7\n")
    cfg = check_config(load_config(TrainConfig, str(p), ["+actor.optimizer.lr=1e-3", "--actor.optimizer.eps=1E-6"]))
    assert cfg.actor.optimizer.lr == 1e-3 and cfg.actor.optimizer.eps == 1e-6 and cfg.checkpoint.resume == 7
    p.write_text(BASE + textwrap.dedent("""\
        checkpoint:
          dir: ck
          resume: auto
        """).replace("BASE", ""))
    cfg = check_config(load_config(TrainConfig, str(p), ["--checkpoint.resume=12"]))
    assert cfg.checkpoint.resume == 12


def test_boundary_classifies_generic_errors(capsys):
    """What a new subcommand gets for free: generic exception classes become one line with the right code; a
    bug keeps its traceback."""
    import errno
    import json

    from archon.errors import RunError, UserError, run_guarded

    def fail(exc):
        def fn():
            raise exc
        return fn

    cases = [
        (fail(FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.bin")), 2, "data/x.bin: No such"),
        (lambda: json.loads('{"a": 1,}'), 2, "invalid JSON at line 1"),
        (fail(UserError("bad key")), 2, "bad key"),
        (fail(RunError("reward.fn 'f' raised")), 1, "reward.fn 'f' raised"),
        (fail(OSError(errno.ENOSPC, "No space left on device", "ck/x")), 1, "no space left on the device"),
        (fail(PermissionError(errno.EACCES, "Permission denied", "/root/run")), 2, "/root/run: Permission denied"),
    ]
    for fn, code, needle in cases:
        assert run_guarded(fn) == code
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("archon: error: ") and needle in err, err
        assert err.count("\n") == 1, err
    assert run_guarded(lambda: 1 / 0) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "archon: internal error: ZeroDivisionError" in err
