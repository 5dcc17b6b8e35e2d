import pytest
import torch
import torch.distributed as dist
from archon_parallel.testing import run_ranks


def _allreduce(rank, world_size, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return t.item()


def _boom(rank, world_size):
    if rank == 1:
        raise ValueError("rank one failed")
    return rank


def _hang(rank, world_size):
    import time

    if rank == 0:
        time.sleep(600)
    return rank


def test_run_ranks_returns_results():
    assert run_ranks(_allreduce, 2, 10) == [21.0, 21.0]


def test_run_ranks_reports_errors():
    with pytest.raises(RuntimeError, match="rank one failed"):
        run_ranks(_boom, 2)


def test_run_ranks_times_out():
    with pytest.raises(TimeoutError):
        run_ranks(_hang, 2, timeout=15)
