"""Model FLOPs utilisation: model FLOPs per token from the model's config, the device's peak from a table by
GPU name (dense bf16 tensor-core TFLOP/s of the spec sheet) or, for devices not in it, a measured matmul rate.

The FLOPs count is the one `benchmarks/train_throughput.py` uses: ``6 * N`` for forward + backward, where N
counts the matmul weights a token meets (attention projections, the MLP or the top-k routed experts and
the router, the LM head; not the embedding lookup), plus causal attention ``12 * L * H * hd * S / 2`` for
documents of mean attended length S (``sum(n^2) / sum(n)`` over the packed documents).
"""

from __future__ import annotations

import functools
import time

import torch

# dense bf16 TFLOP/s by device-name substring, most specific first
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0), ("B200", 2250.0), ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.4), ("H800", 989.4), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("V100", 125.0), ("MI300X", 1307.0), ("MI250X", 383.0),
]


def dense_params_per_token(args) -> float:
    """Matmul weights one token meets in a forward pass (the N of 6N), from the model's ModelArgs."""
    h, nh, nkv, hd = args.dim, args.n_heads, args.n_kv_heads, args.head_dim
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    n = 0.0
    for i in range(args.n_layers):
        if args.is_moe_layer(i):  # Qwen3-MoE: top-k routed experts + the router, no shared experts
            n += attn + args.top_k * 3 * h * args.moe_inter_dim + h * args.num_experts
        else:
            n += attn + 3 * h * args.ffn_dim
    return n + h * args.vocab_size


def flops_per_token(args, mean_attn_len: float) -> float:
    """Training (forward + backward) FLOPs per token for documents of mean attended length `mean_attn_len`."""
    return 6 * dense_params_per_token(args) + 12 * args.n_layers * args.n_heads * args.head_dim * mean_attn_len / 2


def mean_attn_len(cu_seqlens: torch.Tensor) -> float:
    """sum(n^2) / sum(n) over the documents of a packed batch."""
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float((n * n).sum() / n.sum().clamp(min=1))


@functools.cache
def peak_tflops(device_type: str, device_name: str = "") -> tuple[float, str]:
    """(peak TFLOP/s, where it came from): the table for a known GPU, else a measured bf16 (CPU: fp32) matmul."""
    for key, value in PEAK_BF16_TFLOPS:
        if device_type == "cuda" and key in device_name:
            return value, f"spec {key}"
    return _measured_tflops(device_type), "measured matmul"


def device_peak_tflops(device: torch.device) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return peak_tflops(device.type, name)


def _measured_tflops(device_type: str) -> float:
    n, reps = (4096, 10) if device_type == "cuda" else (256, 5)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / max(time.perf_counter() - t, 1e-9) / 1e12
