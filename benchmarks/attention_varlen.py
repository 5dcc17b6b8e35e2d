"""GPU micro-benchmark: fwd+bwd attention on a 64K-token packed batch, varlen vs flex vs padded SDPA.

    python benchmarks/attention_varlen.py [--tokens 65536 --heads 16 --kv-heads 16 --head-dim 128]

Prints tokens/s of each backend (bf16) measured in the same run, each backend's ratio to padded
SDPA, and the max abs difference of outputs and input grads between the backends.
"""

from __future__ import annotations

import argparse

import torch
from archon_attn import build_attn_meta, get_attention_backend


def mixed_lengths(total: int, max_len: int, seed: int) -> list[int]:
    """Document lengths from 1 to max_len (log-uniform: many short, a few long) summing to total."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        n = int(torch.exp(torch.rand(1, generator=g) * torch.log(torch.tensor(float(max_len)))).item())
        lengths.append(max(1, min(n, total - sum(lengths))))
    return lengths


def fwd_bwd(backend, q, k, v, meta, do):
    out = backend(q, k, v, meta)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out, grads


def time_backend(backend, q, k, v, meta, do, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fwd_bwd(backend, q, k, v, meta, do)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fwd_bwd(backend, q, k, v, meta, do)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")

    lengths = mixed_lengths(args.tokens, args.max_len, args.seed)
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    meta = build_attn_meta(cu_seqlens)
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    T, H, G, D = args.tokens, args.heads, args.kv_heads, args.head_dim

    def rand(n: int) -> torch.Tensor:
        return torch.randn(T, n, D, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v = (rand(n).requires_grad_() for n in (H, G, G))
    do = rand(H)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: T={T} tokens in {len(lengths)} docs "
          f"(max {max(lengths)}, {sum(n == 1 for n in lengths)} of length 1), H={H} G={G} D={D}, bf16, fwd+bwd")

    from archon_attn.varlen import VarlenBackend, has_public_varlen_attn

    backends = {"sdpa": get_attention_backend("sdpa"), "varlen": get_attention_backend("varlen"),
                "flex": get_attention_backend("flex")}
    if has_public_varlen_attn():  # the same flash kernel through the ATen ops, to see the public API's overhead
        backends["varlen-aten"] = VarlenBackend(impl="aten")
    names = list(backends)
    results, seconds = {}, {}
    for name in names:
        backend = backends[name]
        out, grads = fwd_bwd(backend, q, k, v, meta, do)
        results[name] = [t.detach().float() for t in (out, *grads)]
        seconds[name] = time_backend(backend, q, k, v, meta, do, args.warmup, args.iters)
    for name in names:
        tok_s = T / seconds[name]
        print(f"{name:>11}: {seconds[name] * 1e3:8.2f} ms/iter  {tok_s / 1e6:8.3f} M tokens/s  "
              f"{seconds['sdpa'] / seconds[name]:5.2f}x padded sdpa")
    for a, b in [("varlen", "sdpa"), ("flex", "sdpa"), ("varlen", "flex")] + [("varlen-aten", "varlen")] * (
            "varlen-aten" in results):
        diffs = [(x - y).abs().max().item() for x, y in zip(results[a], results[b])]
        print(f"max abs diff {a} vs {b}: out {diffs[0]:.3e}  dq {diffs[1]:.3e}  dk {diffs[2]:.3e}  dv {diffs[3]:.3e}")


if __name__ == "__main__":
    main()
