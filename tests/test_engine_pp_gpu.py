"""GPU: the engine under pipeline parallelism (NCCL, varlen attention) equals one GPU; bf16 + compile smoke.

pp2 with 1F1B and Interleaved1F1B (2 stages per rank) in fp32: losses and logprobs at 1e-5, parameters after 3
AdamW steps at 1e-4 (cuBLAS picks reduction orders by shape, AdamW turns that noise in near-zero gradients into
small sign flips). With 4 GPUs also pp2 x dp2 (FSDP2). bf16 + torch.compile is checked against the fp32 loss at
2e-2. Each run is a fresh process (torchrun) so the engine initialises NCCL itself.
"""

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from archon.testing import hf_model, tiny_hf_config

WORKER = str(Path(__file__).with_name("engine_pp_gpu_worker.py"))


def _run(tmp_path, model_dir, allocation, dtype, nproc, schedule="1F1B", spr=1, compile=False) -> dict:
    out = tmp_path / f"{allocation.replace(':', '_')}_{schedule}_{dtype}_{int(compile)}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launch if nproc > 1 else [sys.executable]) + [WORKER, model_dir, allocation, dtype, str(out), schedule,
                                                         str(spr), str(int(compile))]
    subprocess.run(cmd, check=True, timeout=500)
    ranks = [torch.load(f) for f in sorted(glob.glob(f"{out}.rank*.pt"))]
    merged = dict(ranks[0])
    merged["params"] = {k: v for r in ranks for k, v in r["params"].items()}
    return merged


def _compare(ref: dict, got: dict, name: str) -> None:
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(got["fwd"][key], ref["fwd"][key], rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
        assert abs(a - b) <= 1e-5 * abs(a), f"{name} step {i}: loss {b} vs one GPU {a}"
    assert got["params"].keys() == ref["params"].keys()
    for n, a in ref["params"].items():
        rel = float((a - got["params"][n]).norm() / a.norm())
        assert rel <= 1e-4, f"{name} {n}: relative diff {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_pp2_nccl_equals_one_gpu(tmp_path):
    model_dir = tmp_path / "m"
    hf_model(tiny_hf_config("qwen3", vocab_size=64, num_hidden_layers=4)).save_pretrained(model_dir)
    ref = _run(tmp_path, str(model_dir), "archon:d1", "float32", 1)
    _compare(ref, _run(tmp_path, str(model_dir), "archon:p2", "float32", 2), "1F1B")
    _compare(ref, _run(tmp_path, str(model_dir), "archon:p2", "float32", 2, "Interleaved1F1B", 2), "Interleaved1F1B")
    if torch.cuda.device_count() >= 4:
        _compare(ref, _run(tmp_path, str(model_dir), "archon:p2d2", "float32", 4), "pp2xdp2")
        bf16 = _run(tmp_path, str(model_dir), "archon:p2d2", "bfloat16", 4, "Interleaved1F1B", 2, compile=True)
    else:
        bf16 = _run(tmp_path, str(model_dir), "archon:p2", "bfloat16", 2, "Interleaved1F1B", 2, compile=True)
    assert all(abs(a - b) <= 2e-2 * abs(a) for a, b in zip(ref["losses"], bf16["losses"])), bf16["losses"]
