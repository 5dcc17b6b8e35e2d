"""Checkpointer in one process (no process group): resume, pointer, pruning, corruption."""

import os
import random

import pytest
import torch
from archon_ckpt import Checkpointer, CheckpointError, ModelState, iter_dcp_tensors, step_dir_name
from archon_ckpt.testing import full_params, make_model, make_optim, make_state, train_steps


def _run(dropout: float, steps: int, ckpt: Checkpointer | None = None, resume: bool = False,
         copy_on_success: bool = True):
    model = make_model(0, dropout)
    opt, sched = make_optim(model)
    train = {"step": 0}
    state = make_state(model, opt, sched, train)
    if resume:
        assert ckpt.load(state, copy_on_success=copy_on_success) == 3 and train["step"] == 3
    losses = train_steps(model, opt, sched, train, steps)
    if ckpt is not None and not resume:
        ckpt.save(train["step"], state)
    return losses, full_params(model), opt


@pytest.mark.parametrize("copy_on_success", [True, False])
def test_exact_resume_single_process(tmp_path, copy_on_success):
    ref_losses, ref_params, _ = _run(0.2, 6)
    ckpt = Checkpointer(tmp_path)
    first, _, _ = _run(0.2, 3, ckpt)
    torch.manual_seed(123)  # scramble RNG: the restore must bring it back
    random.seed(5)
    second, params, opt = _run(0.2, 3, ckpt, resume=True, copy_on_success=copy_on_success)
    assert first + second == ref_losses  # bitwise
    for k, v in ref_params.items():
        assert torch.equal(params[k], v), k
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_latest_pointer_prune_and_async(tmp_path):
    model = make_model(0)
    train = {"step": 0, "cursor": torch.zeros(3)}
    ckpt = Checkpointer(tmp_path, keep_last_n=2, async_save=True)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
        train["step"] = step
        train["cursor"].fill_(step)
        with torch.no_grad():
            model.head.weight.fill_(step)
        ckpt.save(step, {"model": ModelState(model), "train": train})
    ckpt.close()
    assert ckpt.steps() == [2, 3] and ckpt.latest_step() == 3
    assert (tmp_path / "latest").read_text().strip() == step_dir_name(3)
    assert sorted(os.listdir(tmp_path)) == [".lock", "latest", "step-00000002", "step-00000003"]  # .lock: writer lock
    fresh, train2 = make_model(1), {"step": -1, "cursor": torch.zeros(3)}
    cursor = train2["cursor"]
    assert Checkpointer(tmp_path).load({"model": ModelState(fresh), "train": train2}, step=2) == 2
    assert train2["step"] == 2 and cursor is train2["cursor"] and torch.equal(cursor, torch.full((3,), 2.0))
    assert torch.equal(fresh.head.weight, torch.full_like(fresh.head.weight, 2.0))
    tensors = dict(iter_dcp_tensors(tmp_path / step_dir_name(3), max_batch_bytes=4096))
    assert tensors.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v), k


class _Wider(torch.nn.Module):
    def __init__(self, extra: bool, wide: bool):
        super().__init__()
        base = make_model(7)
        self.embed, self.layers, self.head = base.embed, base.layers, base.head
        self.register_buffer("token_ema", base.token_ema)
        if wide:
            self.head = torch.nn.Linear(32, 65, bias=False)
        if extra:
            self.extra = torch.nn.Linear(2, 2)


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, snap):
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed by a failed load"


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    model = make_model(0)
    opt, sched = make_optim(model)
    train = {"step": 0}
    train_steps(model, opt, sched, train, 1)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, make_state(model, opt, sched, train))

    def fresh_state(m):
        o, s = make_optim(m)
        return make_state(m, o, s, {"step": 0})

    # missing key (the model has a parameter the checkpoint lacks)
    m = _Wider(extra=True, wide=False)
    snap = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"missing key 'model.extra.weight'"):
        ckpt.load(fresh_state(m))
    _assert_unchanged(m, snap)
    # wrong shape
    m = _Wider(extra=False, wide=True)
    snap = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model.head.weight': checkpoint \[64, 32\]"):
        ckpt.load({"model": ModelState(m)})
    _assert_unchanged(m, snap)
    # unexpected key (checkpoint has a tensor the model lacks) unless strict=False
    small = make_model(3, num_layers=1)
    snap = _snapshot(small)
    with pytest.raises(CheckpointError, match=r"unexpected key 'model.layers.1.fc1.bias'"):
        ckpt.load({"model": ModelState(small)})
    _assert_unchanged(small, snap)
    # truncated data file
    m = make_model(5)
    snap = _snapshot(m)
    step_dir = tmp_path / step_dir_name(1)
    data = sorted(p for p in step_dir.iterdir() if p.suffix == ".distcp")[0]
    full = data.read_bytes()
    data.write_bytes(full[: len(full) // 2])
    for copy_on_success in (True, False):  # both: files are checked before any read
        with pytest.raises(CheckpointError, match=f"checkpoint data file {data} is truncated"):
            ckpt.load(fresh_state(m), copy_on_success=copy_on_success)
        _assert_unchanged(m, snap)
    data.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint data file {data} is missing"):
        ckpt.load(fresh_state(m))
    (step_dir / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="not a complete DCP checkpoint"):
        ckpt.load(fresh_state(m))
    _assert_unchanged(m, snap)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(fresh_state(m), step=9)
