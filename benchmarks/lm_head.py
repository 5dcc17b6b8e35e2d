"""GPU micro-benchmark: the LM head's logprob + entropy forward and backward (`head_logprobs`), bf16 autocast.

    python benchmarks/lm_head.py [--tokens 4096 16384 --dim 2048 --vocab 151936]

Times the head eager vs compiled softmax kernels, each with every chunk's logits rebuilt in backward
(`recompute`) or the last chunk's kept (`keep-last`, what the flat runner uses), and prints the extra peak
memory of one step over the inputs.
"""

from __future__ import annotations

import argparse

import torch
from archon.engine.logprobs import head_logprobs


def time_variant(w: torch.nn.Parameter, tokens: int, iters: int, **kw) -> tuple[float, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, w.shape[1], device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, w.shape[0], (tokens,), device="cuda", generator=g)
    g_lp = torch.randn(tokens, device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp, _ = head_logprobs(h, w, y, want_entropy=True, **kw)
        (lp * g_lp).sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    w.grad = None
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    w = torch.nn.Parameter(torch.randn(a.vocab, a.dim, device="cuda") * 0.02)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: D={a.dim} V={a.vocab} chunk={a.chunk}")
    for tokens in a.tokens:
        for backend in (None, "inductor"):
            for keep in (False, True):
                ms, gib = time_variant(w, tokens, a.iters, chunk_size=a.chunk, keep_last_logits=keep,
                                       compile_backend=backend)
                name = f"{'compiled' if backend else 'eager'} {'keep-last' if keep else 'recompute'}"
                print(f"T={tokens:6d} {name:20s} {ms:8.2f} ms  peak +{gib:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
