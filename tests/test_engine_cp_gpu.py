"""GPU: the engine under context parallelism on 2 GPUs (NCCL, varlen inner backend) equals one GPU.

Each run is a fresh process (torchrun for cp2) so the engine initialises NCCL itself. fp32 losses match
at 1e-5; parameters after 3 AdamW steps at 1e-4, because cuBLAS / SDPA pick reduction orders by shape
(a cp rank multiplies [T/cp, D] matrices, one GPU [T, D]) and AdamW turns that noise in near-zero
gradients into small sign flips. bf16 + torch.compile is a smoke check against the fp32 reference (2e-2 on
the loss).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from archon.testing import hf_model, tiny_hf_config

WORKER = str(Path(__file__).with_name("engine_cp_gpu_worker.py"))


def _run(tmp_path, model_dir, allocation, impl, dtype, nproc, compile=False):
    out = tmp_path / f"{allocation.replace(':', '_')}_{impl}_{dtype}_{int(compile)}.pt"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launch if nproc > 1 else [sys.executable]) + [WORKER, model_dir, allocation, impl, dtype, str(out), "cuda",
                                                         str(int(compile))]
    subprocess.run(cmd, check=True, timeout=400)
    return torch.load(out)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp2_nccl_equals_one_gpu(tmp_path):
    model_dir = tmp_path / "m"
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=2)).save_pretrained(model_dir)
    ref = _run(tmp_path, str(model_dir), "archon:d1", "ulysses", "float32", 1)
    for impl in ("ulysses", "ring"):
        got = _run(tmp_path, str(model_dir), "archon:c2", impl, "float32", 2)
        for name in ("logprobs", "entropy"):
            torch.testing.assert_close(got["fwd"][name], ref["fwd"][name], rtol=1e-5, atol=1e-5)
        for i, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
            assert abs(a - b) <= 1e-5 * abs(a), f"{impl} step {i}: loss {b} vs one GPU {a}"
        for n, a in ref["params"].items():
            rel = float((a - got["params"][n]).norm() / a.norm())
            assert rel <= 1e-4, f"{impl} {n}: relative diff {rel:.2e}"
    for impl in ("ulysses", "ring"):  # bf16 with torch.compile on the blocks (the CUDA default)
        bf16 = _run(tmp_path, str(model_dir), "archon:c2", impl, "bfloat16", 2, compile=True)
        assert all(abs(a - b) <= 2e-2 * abs(a) for a, b in zip(ref["losses"], bf16["losses"])), bf16["losses"]
