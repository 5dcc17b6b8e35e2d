"""GPU benchmark: tree training (sparse, dta) vs flat packed training through the real engine, same run.

    python benchmarks/tree_training.py            # Qwen3-1.7B shape, bf16, GRPO + multi-turn batches
    python benchmarks/tree_training.py --quick    # a small smoke run (tiny model, small batches)
    torchrun --nproc-per-node 2 benchmarks/tree_training.py --dp-layouts fsdp,zero1   # archon:d2, both layouts

Model: Qwen3-1.7B-shaped random init (hidden 2048, 28 layers, 16 heads, 8 kv heads, head_dim 128,
ffn 6144, vocab 151936, tied embeddings). Batches: GRPO (16 prompts x 8 samples, 4K-token shared
prompts, 512-2K-token responses, loss on responses) and multi-turn (chains whose every turn extends the
previous one's history). For each batch and each `tree_training_mode` a fresh engine (same seed, same
weights) runs `--warmup` then `--steps` optimizer steps; we report effective tokens/s (FLAT tokens per
second, so modes are comparable), speed-up over `disabled`, peak GPU memory, the tree compression
ratio and the first-step loss (equal across modes up to bf16 noise). Prints a table, then JSON.

Under torchrun (N ranks) every engine is `archon:dN` with each `--dp-layouts` entry (fsdp: FSDP2; zero1:
AReaL's full replicas with a ZeRO-1 optimizer); every rank takes its tree-aware balanced share of the same
global batch (`archon.tree.balance_for_tree`, flat mode too), tokens/s counts the global batch, and peak
memory is the largest of any rank.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from archon.config.schema import ActorConfig
from archon.engine.batch import PackedBatch
from archon.engine.engine import ArchonEngine
from archon.engine.loss import token_separable
from archon.train import sft_loss, target_tokens
from profiling import profile_step  # benchmarks/profiling.py (scripts run from benchmarks/)

FULL = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128)
QUICK = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def write_config(shape: dict, out_dir: str) -> str:
    from transformers import Qwen3Config

    cfg = Qwen3Config(**shape, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
                      rms_norm_eps=1e-6)
    cfg.save_pretrained(out_dir)
    return os.path.join(out_dir, "config.json")


def grpo_batch(g: torch.Generator, vocab: int, prompts: int, samples: int, prompt_len: int, resp: tuple[int, int]
               ) -> PackedBatch:
    seqs, masks = [], []
    for _ in range(prompts):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
        for _ in range(samples):
            n = int(torch.randint(resp[0], resp[1] + 1, (1,), generator=g))
            seqs.append(torch.cat([prompt, torch.randint(0, vocab, (n,), generator=g)]).tolist())
            masks.append([0.0] * prompt_len + [1.0] * n)
    return PackedBatch.from_sequences(seqs, masks)


def multiturn_batch(g: torch.Generator, vocab: int, chains: int, turns: int, turn: tuple[int, int]) -> PackedBatch:
    seqs = []
    for _ in range(chains):
        hist = torch.randint(0, vocab, (turn[1],), generator=g)
        for _ in range(turns):
            n = int(torch.randint(turn[0], turn[1] + 1, (1,), generator=g))
            hist = torch.cat([hist, torch.randint(0, vocab, (n,), generator=g)])
            seqs.append(hist.tolist())
    return PackedBatch.from_sequences(seqs)


def variants(args) -> list[tuple[str, str, int, bool]]:
    """(row name, tree mode, dta block size, loss marked token-separable) for every --modes entry; a dta entry
    runs once per --dta-block-sizes value, and ``dta:pass`` hides sft_loss's separable mark (outputs pass)."""
    out = []
    sizes = [int(x) for x in args.dta_block_sizes.split(",")]
    for entry in args.modes.split(","):
        mode, _, flag = entry.partition(":")
        if mode != "dta":
            out.append((entry, mode, sizes[0], True))
            continue
        for bs in sizes:
            name = entry if len(sizes) == 1 else f"{mode}:b{bs}" + (f":{flag}" if flag else "")
            out.append((name, mode, bs, flag != "pass"))
    return out


def run_mode(cfg_path: str, variant: tuple[str, str, int, bool], batch: PackedBatch, args,
             dp_layout: str = "fsdp") -> dict:
    name, mode, block_size, separable = variant
    loss_fn = sft_loss if separable else token_separable(sft_loss, False)
    actor = ActorConfig(path=cfg_path, init_from_scratch=True, dtype=args.dtype, mb_max_tokens=args.mb_max_tokens,
                        seed=1)
    actor.archon.tree_training_mode = mode
    actor.archon.tree_dta_block_size = block_size
    actor.archon.enable_compile = args.compile
    actor.archon.ac_mode = args.ac
    actor.archon.dp_layout = dp_layout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    eng = ArchonEngine(actor, allocation_mode=f"archon:d{world}", device=args.device).initialize()
    cuda = args.device == "cuda"
    global_tokens = batch.num_tokens
    if world > 1:
        from archon.tree import balance_for_tree, tree_cost_model

        rank, dp = eng.dp_rank_world()
        batch = balance_for_tree(batch, rank, dp, cost_model=tree_cost_model(eng.model))
    first_loss, stats = None, {}
    for _ in range(args.warmup):
        stats = eng.train_batch(batch, loss_fn, target_tokens)
        first_loss = stats["loss"] if first_loss is None else first_loss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stats = eng.train_batch(batch, loss_fn, target_tokens)
        first_loss = stats["loss"] if first_loss is None else first_loss
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    if args.profile and int(os.environ.get("RANK", "0")) == 0:
        profile_step(lambda: eng.train_batch(batch, loss_fn, target_tokens), f"tree_{name.replace(':', '_')}",
                     args.profile)
    elif args.profile:
        eng.train_batch(batch, loss_fn, target_tokens)  # the profiled step is collective: every rank takes it
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if world > 1:
        t = torch.tensor([peak], device=args.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t)
    res = dict(mode=name if world == 1 else f"{name}/{dp_layout}", step_s=dt, tokens_per_s=global_tokens / dt,
               peak_mem_gib=peak, first_loss=first_loss, world=world,
               compression=stats.get("tree_compression", 1.0), tree_tokens=stats.get("tree_tokens", batch.num_tokens))
    eng = None  # free GPU memory before the next mode
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and batches: a smoke run")
    p.add_argument("--modes", default="disabled,sparse,dta",
                   help="disabled, sparse, dta, dta:pass (dta with the loss's token-separable mark hidden)")
    p.add_argument("--batches", default="grpo,multiturn")
    p.add_argument("--mb-max-tokens", type=int, default=None, help="default 16384 (quick: 2048)")
    p.add_argument("--dta-block-sizes", default="8192", help="comma list: every dta entry runs once per size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--ac", default="none", help="actor.archon.ac_mode for every mode")
    p.add_argument("--compile", action="store_true", help="torch.compile blocks (off by default for all modes)")
    p.add_argument("--prompts", type=int, default=16, help="GRPO batch: prompts (x --samples responses each)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--profile", default=None, metavar="DIR", help="profile one extra step per mode into DIR")
    p.add_argument("--dp-layouts", default="fsdp", help="under torchrun: actor.archon.dp_layout values to time")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cpu only to check the script's logic with --quick")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    if args.mb_max_tokens is None:
        args.mb_max_tokens = 2048 if args.quick else 16384
    shape = QUICK if args.quick else FULL
    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    if args.quick:
        batches = {"grpo": lambda: grpo_batch(g, vocab, 4, 4, 256, (64, 128)),
                   "multiturn": lambda: multiturn_batch(g, vocab, 4, 3, (64, 128))}
    else:
        batches = {"grpo": lambda: grpo_batch(g, vocab, args.prompts, args.samples, 4096, (512, 2048)),
                   "multiturn": lambda: multiturn_batch(g, vocab, 16, 4, (512, 1536))}
    results = []
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory() as d:
        cfg_path = write_config(shape, d)
        for bname in args.batches.split(","):
            batch = batches[bname]()
            for variant in variants(args):
                for layout in (args.dp_layouts.split(",") if world > 1 else ["fsdp"]):
                    r = run_mode(cfg_path, variant, batch, args, layout)
                    r.update(batch=bname, flat_tokens=batch.num_tokens, sequences=batch.num_seqs)
                    results.append(r)
                    if rank == 0:
                        print(json.dumps(r), flush=True)
    if rank != 0:
        return
    def key(r):  # speed-ups are against flat training of the same batch and data-parallel layout
        return r["batch"], r["mode"].partition("/")[2]

    base = {key(r): r["tokens_per_s"] for r in results if r["mode"].split("/")[0] == "disabled"}
    print(f"\n{'batch':<10} {'mode':<15} {'flat tok':>9} {'compr':>6} {'eff tok/s':>10} {'vs flat':>8} "
          f"{'peak GiB':>9} {'loss':>9}")
    for r in results:
        r["speedup_vs_disabled"] = r["tokens_per_s"] / base[key(r)] if key(r) in base else None
        sp = f"{r['speedup_vs_disabled']:.2f}x" if r["speedup_vs_disabled"] else "-"
        print(f"{r['batch']:<10} {r['mode']:<15} {r['flat_tokens']:>9} {r['compression']:>6.2f} "
              f"{r['tokens_per_s']:>10.0f} {sp:>8} {r['peak_mem_gib']:>9.1f} {r['first_loss']:>9.4f}")
    out = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__, quick=args.quick,
               mb_max_tokens=args.mb_max_tokens, dta_block_sizes=args.dta_block_sizes, ac=args.ac,
               compile=args.compile, results=results)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
