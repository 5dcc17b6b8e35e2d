"""GPU benchmark: pipeline parallel (pp2 x dp2; 1F1B and Interleaved1F1B) vs plain FSDP2 dp4, same run.

    torchrun --nproc-per-node 4 benchmarks/pp_compare.py            # Qwen3-1.7B shape, bf16
    torchrun --nproc-per-node 4 benchmarks/pp_compare.py --quick    # tiny smoke run

Model: Qwen3-1.7B-shaped random init (hidden 2048, 28 layers, 16 heads, 8 kv heads, head_dim 128, ffn 6144,
vocab 151936) with UNTIED embeddings (pipeline stages cannot share the embedding with the head). Every layout
trains the same global batch (packed documents, `--docs` per step of random length, SFT loss) for `--warmup`
then `--steps` optimizer steps through the real engine. Reported per layout: median step time, tokens/s,
ratio against dp4, first-step loss (equal across layouts up to bf16 noise) and peak GPU memory of every rank
(pipeline stages hold different layers, so memory differs between pp ranks). Prints a table, then JSON.
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
LAYOUTS = [  # (name, allocation, archon knobs)
    ("dp4", "archon:d4", {}),
    ("pp2xdp2 1F1B", "archon:p2d2", {"pp_schedule": "1F1B"}),
    ("pp2xdp2 Interleaved1F1B", "archon:p2d2", {"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2}),
]


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

    actor = ActorConfig(path=path, init_from_scratch=True, dtype="bfloat16", mb_max_tokens=args.mb_tokens, seed=1)
    actor.archon.enable_compile = args.compile
    actor.archon.ac_mode = args.ac
    for k, v in knobs.items():
        setattr(actor.archon, k, v)
    torch.cuda.reset_peak_memory_stats()
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=args.warmup + args.steps,
                       device="cuda").initialize()
    rank, world = eng.dp_rank_world()
    times, first_loss, tokens = [], None, 0
    for step in range(args.warmup + args.steps):
        full = global_batch(step, vocab, args.docs, (args.min_len, args.max_len))
        mine = full.select(list(range(rank, full.num_seqs, world)))
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = eng.train_batch(mine, sft_loss, target_tokens)
        torch.cuda.synchronize()
        if step == 0:
            first_loss = stats["loss"]
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += full.num_tokens
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    del eng
    gc.collect()
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
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.docs, args.min_len, args.max_len, args.mb_tokens = 2, 1, 16, 32, 256, 1024
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if dist.get_world_size() != 4:
        raise SystemExit("run with torchrun --nproc-per-node 4")
    shape = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        path = tmp
        if dist.get_rank() == 0:
            write_config(shape, tmp)
        obj = [tmp]
        dist.broadcast_object_list(obj, src=0)  # every rank reads rank 0's directory (single host)
        path = obj[0]
        dist.barrier()
        results = {name: run_layout(path, alloc, knobs, args, shape["vocab_size"]) for name, alloc, knobs in LAYOUTS}
        dist.barrier()
    if dist.get_rank() == 0:
        base = results["dp4"]["tokens_per_s"]
        print(f"{'layout':<26}{'step s':>9}{'tok/s':>11}{'vs dp4':>8}{'loss0':>9}  peak GiB per rank")
        for name, r in results.items():
            print(f"{name:<26}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / base:>8.2f}"
                  f"{r['first_loss']:>9.4f}  {r['peak_gib_per_rank']}")
        print(json.dumps({"shape": "quick" if args.quick else "qwen3-1.7b-untied", "args": vars(args),
                          "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
