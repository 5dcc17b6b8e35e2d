"""NCCL path of redistribute (CUDA communication tensors); skips without 2 GPUs."""

import pytest
import torch
import torch.distributed as dist
from archon_parallel.testing import run_ranks
from archon_rl import RolloutBatch, redistribute


def _batch() -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    lens = [30, 2, 9, 1, 17, 4, 25, 3, 8, 8, 12, 1, 40, 6]
    return RolloutBatch.from_sequences([
        {"input_ids": torch.randint(0, 1000, (n,), generator=g), "prompt_len": 1,
         "logprobs": torch.randn(n, generator=g), "reward": float(i), "group_id": i // 2}
        for i, n in enumerate(lens)])


def _nccl_worker(rank: int, world_size: int) -> bool:
    # run_ranks gives a gloo default group; redistribute over a separate NCCL group.
    torch.cuda.set_device(rank)
    pg = dist.new_group(backend="nccl")
    try:
        full = _batch()
        local = full.select(range(10) if rank == 0 else range(10, 14))
        for keep in (False, True):
            res = redistribute(local, group=pg, method="kk", keep_groups=keep)
            ref = full.select(res.global_indices)
            for name in ["input_ids", "cu_seqlens", "loss_mask"] + ref.present_fields():
                assert torch.equal(getattr(res.batch, name), getattr(ref, name)), name
            held = [None] * world_size
            dist.all_gather_object(held, res.global_indices)
            assert sorted(held[0] + held[1]) == list(range(full.num_seqs))
    finally:
        dist.destroy_process_group(pg)
    return True


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs + NCCL")
def test_redistribute_nccl():
    assert run_ranks(_nccl_worker, 2, timeout=180) == [True, True]
