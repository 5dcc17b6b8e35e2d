"""GPU benchmark: fwd+bwd of one MoE layer shaped like Qwen3-30B-A3B, archon-moe vs HF transformers.

    python benchmarks/moe_layer.py [--tokens 16384 --iters 20]

Both layers hold the same bf16 weights and see the same input in the same run. HF's
Qwen3MoeSparseMoeBlock runs with ``config._experts_implementation`` in {"eager", "grouped_mm"}.
Prints the median step time (fwd + bwd of ``out.float().pow(2).mean()``), our speed-up over each HF
variant, the TFLOP/s in the routed expert GEMMs (3 * 2 * tokens * top_k * 3 * hidden * expert_dim),
and the max difference of outputs / input grads against HF grouped_mm.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from archon_moe import MoE, MoEArgs
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

HIDDEN, EXPERT_DIM, NUM_EXPERTS, TOP_K = 2048, 768, 128, 8


def hf_block(impl: str) -> torch.nn.Module:
    cfg = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=EXPERT_DIM,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
    )
    cfg._experts_implementation = impl
    return Qwen3MoeSparseMoeBlock(cfg).cuda().to(torch.bfloat16)


def our_layer_from(hf: torch.nn.Module) -> MoE:
    # gate_fp32=False: HF runs the gate GEMM in the hidden dtype; keep the comparison like for like.
    args = MoEArgs(
        dim=HIDDEN, moe_inter_dim=EXPERT_DIM, num_experts=NUM_EXPERTS, top_k=TOP_K, gate_fp32=False
    )
    ours = MoE(args).cuda().to(torch.bfloat16)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.w1.copy_(hf.experts.gate_up_proj[:, :EXPERT_DIM])
        ours.experts.w3.copy_(hf.experts.gate_up_proj[:, EXPERT_DIM:])
        ours.experts.w2.copy_(hf.experts.down_proj)
    return ours


def step(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = layer(x) if isinstance(layer, MoE) else layer(x.unsqueeze(0))
    out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
    out.float().pow(2).mean().backward()
    return out.detach(), x.grad


def time_ms(layer: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step(layer, x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(layer, x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        layer.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--impls", default="eager,grouped_mm")
    a = parser.parse_args()

    import transformers

    print(f"torch {torch.__version__} transformers {transformers.__version__} {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    peers = {}
    for impl in a.impls.split(","):
        torch.manual_seed(0)
        blk = hf_block(impl)
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=0.02)
        peers[impl] = blk
    ours = our_layer_from(next(iter(peers.values())))
    x = torch.randn(a.tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    flops = 3 * 2 * a.tokens * TOP_K * 3 * HIDDEN * EXPERT_DIM

    results = {"ours": time_ms(ours, x, a.warmup, a.iters)}
    for impl, blk in peers.items():
        try:
            results[f"hf_{impl}"] = time_ms(blk, x, a.warmup, a.iters)
        except Exception as ex:  # noqa: BLE001 - a peer variant missing in this transformers version
            print(f"hf {impl} failed: {ex!r}"[:300])

    y_ours, g_ours = step(ours, x)
    ref_impl = "grouped_mm" if "grouped_mm" in peers else next(iter(peers))
    y_ref, g_ref = step(peers[ref_impl], x)
    report = {
        "tokens": a.tokens,
        **{f"{k}_ms": round(v, 3) for k, v in results.items()},
        **{f"speedup_vs_{k}": round(v / results["ours"], 3) for k, v in results.items() if k != "ours"},
        **{f"{k}_expert_tflops": round(flops / (v * 1e-3) / 1e12, 1) for k, v in results.items()},
        f"max_abs_diff_out_vs_hf_{ref_impl}": float((y_ours.float() - y_ref.float()).abs().max()),
        f"max_abs_diff_dx_vs_hf_{ref_impl}": float((g_ours.float() - g_ref.float()).abs().max()),
        "out_abs_max": float(y_ref.float().abs().max()),
        "dx_abs_max": float(g_ref.float().abs().max()),
    }
    print(json.dumps(report, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "moe_layer.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
