"""A save that dies midway (SIGKILL at an arbitrary moment, or a failure between the DCP write
and the rename) leaves the previous checkpoint loadable and ``latest`` pointing at it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import archon_ckpt.checkpointer as checkpointer_mod
import pytest
import torch
from archon_ckpt import Checkpointer, step_dir_name

CHILD = textwrap.dedent("""
    import sys, pathlib, torch
    from archon_ckpt import Checkpointer
    root = pathlib.Path(sys.argv[1])
    ckpt = Checkpointer(root, keep_last_n=2)
    big = torch.empty(16 * 1024 * 1024)  # 64 MB: each save takes a while
    for step in range(1, 100000):
        big.fill_(step)
        ckpt.save(step, {"train": {"step": step, "big": big}})
        if step == 1:
            (root / "ready").write_text("1")
""")


def _load_big(root):
    state = {"train": {"step": -1, "big": torch.zeros(16 * 1024 * 1024)}}
    step = Checkpointer(root).load(state)
    return step, state["train"]


def test_sigkill_during_save_keeps_previous(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)])
    try:
        deadline = time.monotonic() + 180
        while not (root / "ready").exists():
            assert child.poll() is None, "child died before its first checkpoint"
            assert time.monotonic() < deadline, "child too slow to write its first checkpoint"
            time.sleep(0.05)
        time.sleep(1.0)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    print("left after SIGKILL:", sorted(os.listdir(root)))  # usually a half-written .tmp-save dir
    latest = Checkpointer(root).latest_step()
    assert latest is not None and latest >= 1
    step, train = _load_big(root)
    assert step == latest and train["step"] == latest
    assert torch.equal(train["big"], torch.full_like(train["big"], float(latest)))
    # the next writer cleans up whatever the killed save left behind
    ckpt = Checkpointer(root, keep_last_n=1)
    ckpt.save(latest + 1, {"train": {"step": latest + 1}})
    left = sorted(n for n in os.listdir(root) if n != ".lock")  # the writer lock, held by the new writer
    assert left == sorted(["latest", step_dir_name(latest + 1), "ready"])


def test_failure_between_write_and_rename(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"train": {"w": torch.ones(4)}})

    def crash(tmp, final):
        raise OSError("simulated crash after the DCP write, before the rename")

    monkeypatch.setattr(checkpointer_mod, "publish_directory", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save(2, {"train": {"w": torch.full((4,), 2.0)}})
    monkeypatch.undo()
    assert ckpt.latest_step() == 1 and ckpt.steps() == [1]
    state = {"train": {"w": torch.zeros(4)}}
    assert Checkpointer(tmp_path).load(state) == 1
    assert torch.equal(state["train"]["w"], torch.ones(4))
