"""Multi-rank (CPU gloo) checkpoints: exact FSDP2 resume in new processes, and resharding
FSDP2(2) -> FSDP2(4) / single process, TP2 -> FSDP2(2), against a single-process reference run."""

import pytest
import torch
from archon_ckpt import (
    Checkpointer,
    CheckpointError,
    HFSource,
    ModelState,
    SafetensorsReader,
    load_into_module,
    save_safetensors_multi_writer,
    save_safetensors_sharded,
)
from archon_ckpt.testing import (
    full_params,
    hf_reference,
    make_model,
    make_optim,
    make_state,
    native_to_hf,
    train_steps,
)
from archon_parallel.testing import run_ranks
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

DROP = 0.2


def _fsdp(model, world):
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tp(model, world):
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        parallelize_module(layer, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    return model


def _setup(model):
    opt, sched = make_optim(model)
    train = {"step": 0}
    return model, opt, sched, train, make_state(model, opt, sched, train)


def _phase1(rank, world, root):
    out = {}
    model, opt, sched, train, _ = _setup(_fsdp(make_model(0, DROP), world))
    out["straight"] = train_steps(model, opt, sched, train, 6, rank, world)
    out["straight_params"] = full_params(model)

    model, opt, sched, train, state = _setup(_fsdp(make_model(0, DROP), world))
    out["first"] = train_steps(model, opt, sched, train, 3, rank, world)
    Checkpointer(f"{root}/drop").save(3, state)

    model, opt, sched, train, state = _setup(_fsdp(make_model(0), world))
    train_steps(model, opt, sched, train, 3, rank, world)
    with Checkpointer(f"{root}/fsdp", async_save=True) as ckpt:
        ckpt.save(3, state)
    out["fsdp_cont"] = train_steps(model, opt, sched, train, 3, rank, world)

    model, opt, sched, train, state = _setup(_tp(make_model(0), world))
    train_steps(model, opt, sched, train, 3)
    Checkpointer(f"{root}/tp").save(3, state)
    out["tp_cont"] = train_steps(model, opt, sched, train, 3)
    return out


def _resume(rank, world, root, name, dropout):
    model, opt, sched, train, state = _setup(_fsdp(make_model(1, dropout), world))
    torch.manual_seed(99 + rank)  # the RNG restore must undo this
    assert Checkpointer(f"{root}/{name}").load(state) == 3 and train["step"] == 3
    return train_steps(model, opt, sched, train, 3, rank, world), full_params(model)


def _hf_io(rank, world, root):
    """HF safetensors into FSDP2- and TP-sharded models; sharded export from DTensors."""
    out = {}
    # a combine function forces the full-tensor read + local split path; plain keys read slices
    full_read = lambda n: HFSource((native_to_hf(n),), lambda ts: ts[0])
    for name, parallelize, mapping in (("fsdp", _fsdp, native_to_hf), ("tp", _tp, native_to_hf),
                                       ("fsdp_full", _fsdp, full_read), ("tp_full", _tp, full_read)):
        model = parallelize(make_model(5), world)
        load_into_module(model, SafetensorsReader(f"{root}/hf.safetensors"), native_to_hf=mapping)
        out[name] = full_params(model)
    named = ((native_to_hf(k), v) for k, v in model.state_dict().items())
    out["files"] = save_safetensors_sharded(named, f"{root}/export", max_shard_size=8000)
    return out


def _multi_writer(rank, world, root):
    """Each rank writes its own half of the layers (as a pipeline stage does) into one indexed directory; a
    duplicate name and a rank-1-only writer group fail on every rank with the reason."""
    import torch.distributed as dist

    hf = hf_reference(make_model(3))
    mine = {k: v for k, v in hf.items() if f"layers.{rank}." in k or (rank == 0 and "layers." not in k)}
    out = {"files": save_safetensors_multi_writer(mine, f"{root}/multi", writers=dist.group.WORLD,
                                                  max_shard_size=8000)}
    errors = []
    only_rank1 = dist.new_group([1])
    for tensors, group in ((hf, dist.group.WORLD), (mine, only_rank1 if rank == 1 else None)):
        try:
            save_safetensors_multi_writer(tensors, f"{root}/bad", writers=group)
        except (RuntimeError, ValueError) as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


def _phase2(rank, world, root):
    return {"drop": _resume(rank, world, root, "drop", DROP), "tp_to_dp": _resume(rank, world, root, "tp", 0.0),
            "hf": _hf_io(rank, world, root), "multi": _multi_writer(rank, world, root)}


def _mismatch(rank, world, root):
    """A mismatched load fails on every rank (no hang) and changes nothing."""
    model = _fsdp(make_model(2, num_layers=1), world)
    before = full_params(model)
    try:
        Checkpointer(f"{root}/fsdp").load({"model": ModelState(model)})
    except CheckpointError as e:
        msg = str(e)
    else:
        msg = None
    after = full_params(model)
    return msg, all(torch.equal(before[k], after[k]) for k in before)


def _phase3(rank, world, root):
    return _mismatch(rank, world, root), _resume(rank, world, root, "fsdp", 0.0)


def _close(a, b, rel=1e-6):
    assert a == pytest.approx(b, rel=rel, abs=0), (a, b)


def test_fsdp_exact_resume_and_resharding(tmp_path):
    root = str(tmp_path)
    p1 = run_ranks(_phase1, 2, root, timeout=240)
    hf_ref = make_model(3)
    save_file(hf_reference(hf_ref), f"{root}/hf.safetensors")
    p2 = run_ranks(_phase2, 2, root, timeout=240)  # new processes
    # HF weights into DTensor-sharded models, and a gathered sharded export (rank 0 writes)
    for r in range(2):
        for layout in ("fsdp", "tp", "fsdp_full", "tp_full"):
            for k, v in hf_ref.state_dict().items():
                assert torch.equal(p2[r]["hf"][layout][k], v), (layout, k)
    assert len(p2[0]["hf"]["files"]) > 1 and p2[1]["hf"]["files"] == []
    exported = {}
    for f in p2[0]["hf"]["files"]:
        exported.update(load_file(str(f)))
    expected = hf_reference(hf_ref)
    assert exported.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(exported[k], v), k
    # several writers, one index: the same tensors as the single-writer export
    multi = SafetensorsReader(f"{root}/multi")
    assert sorted(multi.keys()) == sorted(expected) and len(multi.files()) > 2 and p2[1]["multi"]["files"] == []
    for k, v in expected.items():
        assert torch.equal(multi.get(k), v), k
    for r in p2:
        dup, no_rank0 = r["multi"]["errors"]
        assert "failed: rank 0: ValueError: duplicate tensor name" in dup and "rank 0" in no_rank0, (dup, no_rank0)
    # exact resume: 3 + save + (new processes) load + 3 == 6 straight, bitwise
    for r in range(2):
        assert p1[r]["first"] + p2[r]["drop"][0] == p1[r]["straight"]
        for k, v in p1[r]["straight_params"].items():
            assert torch.equal(p2[r]["drop"][1][k], v), k

    # independent reference: plain single-process training, no parallelism, no checkpoint
    model, opt, sched, train, _ = _setup(make_model(0))
    ref = train_steps(model, opt, sched, train, 6)[3:]
    _close(p1[0]["fsdp_cont"], ref)
    _close(p1[0]["tp_cont"], ref)
    _close(p2[0]["tp_to_dp"][0], ref)  # TP2 checkpoint -> FSDP2 on 2 ranks

    p3 = run_ranks(_phase3, 4, root, timeout=240)  # FSDP2(2) checkpoint -> FSDP2(4)
    for msg, unchanged in (r[0] for r in p3):
        assert msg is not None and "unexpected key 'model.layers.1.fc1.weight'" in msg and unchanged
    p3 = [r[1] for r in p3]
    _close(p3[0][0], ref)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(p3[0][1][k], v, rtol=1e-5, atol=1e-6)

    # FSDP2(2) checkpoint -> one process without a process group
    model, opt, sched, train, state = _setup(make_model(1))
    assert Checkpointer(f"{root}/fsdp").load(state) == 3
    _close(train_steps(model, opt, sched, train, 3), ref)
