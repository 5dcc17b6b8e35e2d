"""GPU benchmark: pipeline parallel (1F1B and Interleaved1F1B) vs plain FSDP2, same run, on 4 or 2 ranks.

    torchrun --nproc-per-node 4 benchmarks/pp_compare.py            # Qwen3-1.7B shape, bf16: pp2 x dp2 vs dp4
    torchrun --nproc-per-node 2 benchmarks/pp_compare.py            # on 2 GPUs: pp2 vs dp2
    torchrun --nproc-per-node 4 benchmarks/pp_compare.py --quick    # tiny smoke run
    torchrun --nproc-per-node 2 benchmarks/pp_compare.py --quick --device cpu    # CPU smoke run (gloo, fp32)

Layouts (the interleaved schedule with 2 stages per rank):
- 4 ranks: dp4 (archon:d4), pp2xdp2 1F1B and pp2xdp2 Interleaved1F1B (archon:p2d2);
- 2 ranks: dp2 (archon:d2), pp2 1F1B and pp2 Interleaved1F1B (archon:p2).

Model: Qwen3-1.7B-shaped random init (hidden 2048, 28 layers, 16 heads, 8 kv heads, head_dim 128, ffn 6144,
vocab 151936) with UNTIED embeddings (pipeline stages cannot share the embedding with the head). Every layout
trains the same global batch (packed documents, `--docs` per step of random length, SFT loss) for `--warmup`
then `--steps` optimizer steps through the real engine. Reported per layout: median step time, tokens/s,
ratio against the dp layout (dp4 / dp2), first-step loss (equal across layouts up to bf16 noise) and peak GPU
memory of every rank (pipeline stages hold different layers, so memory differs between pp ranks). Prints a
table, then JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

FULL = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128)
QUICK = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)
LAYOUTS = {  # world size -> [(name, allocation, archon knobs)]; the first is the baseline of the ratios
    4: [("dp4", "archon:d4", {}),
        ("pp2xdp2 1F1B", "archon:p2d2", {"pp_schedule": "1F1B"}),
        ("pp2xdp2 Interleaved1F1B", "archon:p2d2", {"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2})],
    2: [("dp2", "archon:d2", {}),
        ("pp2 1F1B", "archon:p2", {"pp_schedule": "1F1B"}),
        ("pp2 Interleaved1F1B", "archon:p2", {"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2})],
}


def write_config(shape: dict, out_dir: str) -> str:
    from transformers import Qwen3Config

    Qwen3Config(**shape, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False,
                rms_norm_eps=1e-6).save_pretrained(out_dir)
    return os.path.join(out_dir, "config.json")


def global_batch(step: int, vocab: int, docs: int, lengths: tuple[int, int]):
    from archon.engine.batch import PackedBatch

    g = torch.Generator().manual_seed(1000 + step)
    lens = torch.randint(lengths[0], lengths[1] + 1, (docs,), generator=g).tolist()
    return PackedBatch.from_sequences([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens])


def run_layout(path: str, allocation: str, knobs: dict, args, vocab: int) -> dict:
    from archon.config.schema import ActorConfig
    from archon.engine.engine import ArchonEngine
    from archon.train import sft_loss, target_tokens

    cuda = args.device == "cuda"
    actor = ActorConfig(path=path, init_from_scratch=True, dtype=args.dtype, mb_max_tokens=args.mb_tokens, seed=1)
    actor.archon.enable_compile = args.compile
    actor.archon.ac_mode = args.ac
    for k, v in knobs.items():
        setattr(actor.archon, k, v)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=args.warmup + args.steps,
                       device=args.device).initialize()
    rank, world = eng.dp_rank_world()
    times, first_loss, tokens = [], None, 0
    for step in range(args.warmup + args.steps):
        full = global_batch(step, vocab, args.docs, (args.min_len, args.max_len))
        mine = full.select(list(range(rank, full.num_seqs, world)))
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = eng.train_batch(mine, sft_loss, target_tokens)
        if cuda:
            torch.cuda.synchronize()
        if step == 0:
            first_loss = stats["loss"]
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += full.num_tokens
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=args.device)
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    del eng
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    step_s = statistics.median(times)
    return {"step_s": step_s, "tokens_per_s": tokens / sum(times), "first_loss": first_loss,
            "peak_gib_per_rank": [round(float(p), 2) for p in peaks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke run)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--docs", type=int, default=64, help="documents per global step")
    ap.add_argument("--min-len", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--mb-tokens", type=int, default=8192, help="micro-batch token budget per rank")
    ap.add_argument("--ac", default="full", help="activation checkpointing mode for every layout")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo smoke run")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu) | bfloat16 | float32")
    args = ap.parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.quick:
        args.steps, args.warmup, args.docs, args.min_len, args.max_len, args.mb_tokens = 2, 1, 16, 32, 256, 1024
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world not in LAYOUTS:
        raise SystemExit(f"world size is {world}; run with torchrun --nproc-per-node 2 or 4")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo")
    layouts = LAYOUTS[world]
    shape = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        path = tmp
        if dist.get_rank() == 0:
            write_config(shape, tmp)
        obj = [tmp]
        dist.broadcast_object_list(obj, src=0)  # every rank reads rank 0's directory (single host)
        path = obj[0]
        dist.barrier()
        results = {name: run_layout(path, alloc, knobs, args, shape["vocab_size"]) for name, alloc, knobs in layouts}
        dist.barrier()
    if dist.get_rank() == 0:
        base_name = layouts[0][0]
        base = results[base_name]["tokens_per_s"]
        print(f"{'layout':<26}{'step s':>9}{'tok/s':>11}{'vs ' + base_name:>8}{'loss0':>9}  peak GiB per rank")
        for name, r in results.items():
            print(f"{name:<26}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / base:>8.2f}"
                  f"{r['first_loss']:>9.4f}  {r['peak_gib_per_rank']}")
        print(json.dumps({"shape": "quick" if args.quick else "qwen3-1.7b-untied", "world_size": world,
                          "args": vars(args), "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
