"""Fault tests: hostile checkpoint files run no code, a full disk or a SIGKILL during save keeps the last good
checkpoint, a second writer fails fast, steps never go backwards, export never destroys, non-finite steps and
failing rewards end the run with a message, a stalled rank ends a 2-rank gloo job within the timeout."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from archon.cli import main
from archon_ckpt import (
    Checkpointer,
    CheckpointError,
    RNGState,
    UnsafeCheckpointError,
    WriterLockError,
    iter_dcp_tensors,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny_qwen3" / "config.json")
TRAIN = f"""\
total_train_steps: 2
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


class Evil:
    """Unpickling this calls `Path.touch(marker)`: proof that loading ran code from the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("archon:")]
    assert len(lines) == 1 and lines[0].startswith("archon: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step `archon train` run with its checkpoint in ck/ (step 2)."""
    root = tmp_path_factory.mktemp("trained")
    (root / "c.yaml").write_text(TRAIN)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "c.yaml", "--checkpoint.dir=ck"]) == 0
    finally:
        os.chdir(cwd)
    assert (root / "ck" / "latest").read_text().strip() == "step-00000002"
    return root


# -- loading runs no code --------------------------------------------------------------------------------------
def test_hostile_metadata_runs_no_code(tmp_path, capsys):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, {"w": {"t": torch.ones(3)}})
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / "step-00000001" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker))))
    with pytest.raises(CheckpointError, match="pathlib.Path.touch|PosixPath.touch|touch"):
        ck.load({"w": {"t": torch.zeros(3)}})
    with pytest.raises(CheckpointError):
        list(iter_dcp_tensors(tmp_path / "ck" / "step-00000001", prefix="w."))
    assert main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "out"), "--model", TINY]) == 2
    assert "not part of DCP checkpoint metadata" in _err_line(capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_hostile_values_and_rng_blob_run_no_code(tmp_path):
    marker = tmp_path / "pwned"
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, {"train": {"step": Evil(str(marker))}})  # a DCP bytes entry
    with pytest.raises(CheckpointError, match="checkpoint value 'train.step': refusing to load it"):
        ck.load({"train": {"step": 0}})
    assert not marker.exists()
    # An RNG blob (torch.save of a dict inside the bytes entry) that names a callable.
    blob = __import__("io").BytesIO()
    torch.save({"torch_cpu": torch.get_rng_state(), "python": Evil(str(marker))}, blob)
    ck2 = Checkpointer(tmp_path / "ck2")
    dcp.save({"rng": {"rank0": blob.getvalue()}}, checkpoint_id=str(tmp_path / "ck2" / "step-00000001"),
             no_dist=True)
    state = torch.get_rng_state()
    with pytest.raises(UnsafeCheckpointError, match="RNG state of rank 0: refusing to load it"):
        ck2.load({"rng": RNGState()})
    assert not marker.exists() and torch.equal(torch.get_rng_state(), state)


def test_rng_state_round_trip_weights_only(tmp_path):
    """The safe loader still restores every stream (torch, python, numpy) exactly."""
    import random

    import numpy as np

    ck = Checkpointer(tmp_path / "ck")
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    ck.save(1, {"rng": RNGState()})
    want = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ck.load({"rng": RNGState()})
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


# -- writers never destroy -------------------------------------------------------------------------------------
def test_disk_full_during_save_keeps_the_last_checkpoint(trained, tmp_path, monkeypatch, capsys):
    import shutil

    import torch.distributed.checkpoint.filesystem as fs

    shutil.copytree(trained / "ck", tmp_path / "ck")
    (tmp_path / "c.yaml").write_text(TRAIN)
    monkeypatch.chdir(tmp_path)

    def full(*args, **kwargs):  # the disk fills while DCP writes the shards (private DCP writer, test only)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full)
    code = main(["train", "c.yaml", "--checkpoint.dir=ck", "--checkpoint.resume=auto", "--total_train_steps=3"])
    assert code == 1
    assert "no space left on the device" in _err_line(capsys)
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".lock", "latest", "step-00000002"]


def test_sigkill_during_save_keeps_the_last_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        import archon_ckpt.checkpointer as c
        ck = c.Checkpointer({str(tmp_path / 'ck')!r}, writer=True)
        ck.save(1, {{"w": {{"t": torch.ones(4)}}}})
        def hang(tmp, final):
            print("WRITTEN", flush=True)
            time.sleep(120)
        c.publish_directory = hang
        ck.save(2, {{"w": {{"t": torch.full((4,), 2.0)}}}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
    finally:
        proc.kill()
        proc.wait()
    root = tmp_path / "ck"
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert any(".tmp-" in p.name for p in root.iterdir())  # the killed writer's partial step
    ck = Checkpointer(root, writer=True)  # the lock died with the process; the next writer cleans up
    assert not any(".tmp-" in p.name for p in root.iterdir())
    state = {"w": {"t": torch.zeros(4)}}
    assert ck.load(state) == 1 and torch.equal(state["w"]["t"], torch.ones(4))
    ck.close()


def test_second_writer_fails_fast(trained, tmp_path, monkeypatch, capsys):
    holder = Checkpointer(tmp_path / "ck", writer=True)
    with pytest.raises(WriterLockError, match=f"pid {os.getpid()}"):
        Checkpointer(tmp_path / "ck", writer=True)
    (tmp_path / "c.yaml").write_text(TRAIN)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    assert main(["train", "c.yaml", "--checkpoint.dir=ck"]) == 2
    assert "is being written by another run" in _err_line(capsys)
    assert _snapshot(tmp_path) == before
    holder.close()
    Checkpointer(tmp_path / "ck", writer=True).close()  # free again


def test_steps_never_go_backwards(trained, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(trained / "ck", tmp_path / "ck")
    (tmp_path / "c.yaml").write_text(TRAIN)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path / "ck")
    assert main(["train", "c.yaml", "--checkpoint.dir=ck", "--checkpoint.resume=auto",
                 "--total_train_steps=1"]) == 2
    assert "at step 2, past total_train_steps=1" in _err_line(capsys)
    assert _snapshot(tmp_path / "ck") == before
    ck = Checkpointer(tmp_path / "other", writer=True)
    ck.save(5, {"w": {"t": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="steps never go backwards"):
        ck.save(4, {"w": {"t": torch.ones(1)}})
    ck.close()


@pytest.mark.parametrize("target, extra, needle", [
    ("ck", [], "is the checkpoint"),
    (".", [], "a folder holding it"),
    ("ck/step-00000002/hf", [], "inside the checkpoint"),
    ("full", [], "is not empty; pass --overwrite"),
    ("ckcopy", ["--overwrite"], "holds a training checkpoint"),
    ("new", ["--model", "big/config.json"], "does not match checkpoint"),
    ("new", ["--dtype", "int4"], "export dtype 'int4'"),
    ("new", ["--bogus"], "unknown argument '--bogus'"),
])
def test_export_never_destroys(trained, monkeypatch, capsys, target, extra, needle):
    monkeypatch.chdir(trained)
    (trained / "full").mkdir(exist_ok=True)
    (trained / "full" / "keep.txt").write_text("mine")
    if not (trained / "ckcopy").exists():
        __import__("shutil").copytree(trained / "ck", trained / "ckcopy")
    big = json.loads(Path(TINY).read_text()) | {"hidden_size": 128}
    (trained / "big").mkdir(exist_ok=True)
    (trained / "big" / "config.json").write_text(json.dumps(big))
    before = _snapshot(trained)
    args = ["export-hf", "ck", target, "--model", TINY]
    if "--model" in extra:
        args = args[:-2]
    assert main(args + extra) == 2
    assert needle in _err_line(capsys)
    assert _snapshot(trained) == before


def test_export_overwrite_replaces_only_a_plain_directory(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(["export-hf", str(trained / "ck"), str(out), "--model", TINY, "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()


# -- non-finite steps, rewards ---------------------------------------------------------------------------------
def test_non_finite_steps_stop_the_run(tmp_path, monkeypatch, capsys):
    """lr=1e30 blows the weights up after one update; every later step has a non-finite loss and is skipped,
    max_skipped_steps in a row end the run with exit code 1, and metrics.jsonl stays strict JSON."""
    (tmp_path / "c.yaml").write_text(TRAIN)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "c.yaml", "+actor.optimizer.lr=1e30", "--actor.optimizer.gradient_clipping=0",
                 "--total_train_steps=8", "--max_skipped_steps=3"])
    assert code == 1
    assert "3 steps in a row" in _err_line(capsys)

    def no_constants(name):
        raise AssertionError(f"metrics.jsonl holds {name}")

    rows = [json.loads(ln, parse_constant=no_constants) for ln in (tmp_path / "run/metrics.jsonl").open()]
    assert rows[-1]["update_skipped"] == 1.0 and rows[-1]["grad_norm"] is None
    assert sum(r["update_skipped"] for r in rows) == 3 and rows[0]["update_skipped"] == 0.0


RL = f"""\
total_train_steps: 2
device: cpu
actor:
  path: {TINY}
  dtype: float32
rl:
  batch_size: 4
  group_size: 2
sampling:
  max_new_tokens: 2
log:
  dir: run
  progress_bar: false
"""


@pytest.mark.parametrize("body, needle", [
    ("raise KeyError('answer')", "reward.fn 'rewards.py:fn' raised KeyError"),
    ("return float('nan')", "reward.fn 'rewards.py:fn' returned nan"),
    ("return 'high'", "reward.fn 'rewards.py:fn' returned 'high'"),
])
def test_bad_reward_ends_the_run(tmp_path, monkeypatch, capsys, body, needle):
    (tmp_path / "c.yaml").write_text(RL)
    (tmp_path / "rewards.py").write_text(f"def fn(prompt, response, **fields):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["rl", "c.yaml", "--reward.fn=rewards.py:fn"]) == 1
    assert needle in _err_line(capsys)


# -- a stalled rank --------------------------------------------------------------------------------------------
STALL = """
import os, signal, sys, torch, torch.distributed as dist
from archon.errors import run_guarded
from archon.run_guard import RunGuard, init_process_group

def job():
    init_process_group(torch.device("cpu"), 3.0)
    guard = RunGuard(max_skipped_steps=3, timeout_s=3.0)
    sub = dist.new_group([0, 1])  # a group created later gets the same timeout
    print("READY", flush=True)
    for step in range(1, 1000):
        if dist.get_rank() == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        with guard.step(step):
            dist.all_reduce(torch.ones(1), group=sub if step % 2 else None)
    print("FINISHED", flush=True)

sys.exit(run_guarded(job))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stalled_rank_ends_the_job_within_the_timeout(tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", STALL], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        assert procs[0].stdout.readline().strip() == "READY"  # process start-up is not part of the timeout
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert procs[0].returncode == 1, err
    line = [ln for ln in err.splitlines() if ln.startswith("archon: error:")]
    assert line and "rank 1 stopped responding" in line[0] and "timeout_s=3s" in line[0], err
    assert "Traceback" not in err and "FINISHED" not in out
    assert waited < 30, waited  # 3 s timeout + 3 s heartbeat check, not gloo's default 30 minutes
