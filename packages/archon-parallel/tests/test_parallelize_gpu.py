"""NCCL on 2 GPUs: FSDP2 (fp32, bf16 mixed precision, no resharding), TP2+SP vs the CPU
single-process reference. Skipped without 2 CUDA devices.

GPU kernels differ from CPU ones in summation order, so fp32 is compared at 1e-4 relative (TF32 off);
bf16 params are compared to the fp32 losses at 3e-2.
"""

import datetime
import importlib.util
import pathlib

import pytest
import torch
import torch.distributed as dist
from archon_parallel.dims import ParallelDims
from archon_parallel.fsdp import FSDPConfig
from archon_parallel.parallelize import parallelize
from archon_parallel.testing import free_port, run_ranks

pytestmark = pytest.mark.gpu

_spec = importlib.util.spec_from_file_location("_tiny", pathlib.Path(__file__).with_name("test_parallelize.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

CASES = [("archon:d2", "none", FSDPConfig(param_dtype="float32")),
         ("archon:t2", "selective", None),
         ("archon:d2", "full", FSDPConfig(param_dtype="bfloat16", reduce_dtype="float32")),
         ("archon:d2", "none", FSDPConfig(param_dtype="float32", reshard_after_forward="never"))]


def _nccl_rank(rank, world_size, port):
    dist.destroy_process_group()  # run_ranks starts gloo; move to NCCL on our own port
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = []
    for alloc, ac, fsdp in CASES:
        dims = ParallelDims.from_allocation(alloc, world_size)
        model = tiny.make_model().cuda()
        parallelize(model, dims, tiny.PLAN, device_type="cuda", ac=ac, fsdp=fsdp)
        dp_rank = rank if dims.dp_enabled else 0
        per_rank = tiny.NUM_SEQS // dims.dp
        ids = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        losses, params = _train_cuda(model, ids)
        out.append((losses, {k: v.float().cpu() for k, v in params.items()}))
    return out


def _train_cuda(model, ids):
    tokens, labels = tiny.make_data()
    original = tiny.make_data
    tiny.make_data = lambda: (tokens.cuda(), labels.cuda())
    try:
        return tiny.train(model, ids, reduce_group=dist.group.WORLD)
    finally:
        tiny.make_data = original


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_layouts_match_cpu_reference():
    ref_losses, ref_params = tiny.reference()
    results = run_ranks(_nccl_rank, 2, free_port(), timeout=300)
    for (alloc, ac, fsdp), per_case in zip(CASES, zip(*results)):
        bf16 = fsdp is not None and fsdp.param_dtype == "bfloat16"
        tol = 3e-2 if bf16 else 1e-4
        for losses, params in per_case:
            for got, want in zip(losses, ref_losses):
                assert abs(got - want) <= tol * abs(want), (alloc, ac, fsdp, got, want)
            if not bf16:
                for name, want in ref_params.items():
                    assert tiny._rel(params[name], want) <= tol, (alloc, name)
