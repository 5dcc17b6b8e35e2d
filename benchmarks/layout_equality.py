"""Do multi-GPU layouts of the engine give the numbers of one GPU? Losses and parameters after a few bf16 steps.

    export PYTHONPATH=$(ls -d packages/*/src | paste -sd:)    # (the script also finds packages/*/src itself)
    python3 benchmarks/layout_equality.py --suite dense --ref OUT                          # reference, 1 GPU
    torchrun --nproc-per-node 4 benchmarks/layout_equality.py --suite dense --ref OUT      # every layout, 4 GPUs
    torchrun --nproc-per-node 2 benchmarks/layout_equality.py --suite dense --ref OUT      # or the 2-GPU layouts
    (suites: dense, moe, cp; CPU smoke: add `--device cpu --quick` to the commands)

The reference run (world size 1) writes a random HF model directory OUT/model_SUITE (fixed seed), trains it
`--steps` optimizer steps as `archon:d1` and saves OUT/ref_SUITE.pt: losses, grad norms, step times, the
initial parameters p0 and the final parameters; 2- and 4-rank runs share it. The torchrun run (2 or 4 ranks,
one process per rank) builds one engine per layout of the suite for that world size from the SAME model
directory, one after the other in one process group, trains the same global batches (each data-parallel rank
takes every dp-th document, for any dp size) and compares with the reference on rank 0:

- loss rel: max over steps of |loss - ref| / |ref|
- param rel: max over tensors of ||final - ref final|| / ||ref final|| (and the worst tensor)
- update rel: max over tensors of ||final - ref final|| / ||ref final - p0||: how much of the few-step update
  differs (1.0 = as large as the update itself); also the median over tensors
- init rel: the same for the initial parameters (0 unless loading differs between layouts)
- step time: step 1 alone and the median of steps 2.. (cuda sync + barrier around each train_batch),
  tokens/s = mean global tokens of steps 2.. / that median, peak allocated GiB of every rank

Suites (GPU sizes; --quick shrinks the model and the batch for a CPU smoke run); layouts on 4 ranks / 2 ranks:
- dense: Qwen3 (hidden 512, 4 layers, 8 heads, 4 kv heads, head dim 64, ffn 1536, vocab 8192, untied);
  32 documents of 64..2048 tokens per step; 4: archon:d4 (FSDP4), archon:r2d2 (HSDP 2x2), archon:d2t2
  (FSDP2 x TP2); 2: archon:d2 (FSDP2), archon:t2 (TP2 with sequence parallel)
- moe: Qwen3-MoE (same attention, layer 0 dense, 16 experts top-4, expert dim 256, router aux loss 0: it is
  computed per micro-batch / rank, a different function of the batch by design); same batches;
  4: archon:d4e4 (ep4) and archon:d4 (ep1: experts FSDP-sharded over 4 data-parallel ranks);
  2: archon:d2e2 (ep2) and archon:d2 (ep1: experts FSDP-sharded over 2 data-parallel ranks)
- cp: the dense model; 2 sequences of 32768 tokens per step; 4: archon:d2c2 (Ulysses) and archon:c4 (ring);
  2: archon:c2 (Ulysses) and archon:c2 (ring)

bf16 on GPU (fp32 master weights, varlen attention, no compile), fp32 on CPU, AdamW lr 1e-4 eps 1e-6, seed 5.
The script reports; it does not assert: it prints `CHECK` lines (loss rel > 2e-2, init rel > 0, missing
tensors, errors) and exits 0. Writes OUT/eq_SUITE_wN.json (N = world size: eq_dense_w2.json, eq_dense_w4.json;
eq_SUITE_quick_wN.json with --quick) after every layout and prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import archon  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH: use the workspace sources
    _root = Path(__file__).resolve().parent.parent
    sys.path[:0] = sorted(glob.glob(str(_root / "packages" / "*" / "src")))

DENSE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=40960, tie_word_embeddings=False)
DENSE_QUICK = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
MOE = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, decoder_sparse_step=1,
           mlp_only_layers=[0], norm_topk_prob=True, router_aux_loss_coef=0.0)
MOE_QUICK = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                 mlp_only_layers=[0], norm_topk_prob=True, router_aux_loss_coef=0.0)

# suite -> model type, {world size: layouts (table name, allocation, actor.archon knobs)}
SUITES = {
    "dense": ("qwen3", {
        4: [("archon:d4", "archon:d4", {}), ("archon:r2d2", "archon:r2d2", {}), ("archon:d2t2", "archon:d2t2", {})],
        2: [("archon:d2", "archon:d2", {}), ("archon:t2", "archon:t2", {})]}),
    "moe": ("qwen3_moe", {
        4: [("archon:d4e4 (ep4)", "archon:d4e4", {}), ("archon:d4 (ep1x4)", "archon:d4", {})],
        2: [("archon:d2e2 (ep2)", "archon:d2e2", {}), ("archon:d2 (ep1x2)", "archon:d2", {})]}),
    "cp": ("qwen3", {
        4: [("archon:d2c2 ulysses", "archon:d2c2", {"cp_impl": "ulysses"}),
            ("archon:c4 ring", "archon:c4", {"cp_impl": "ring"})],
        2: [("archon:c2 ulysses", "archon:c2", {"cp_impl": "ulysses"}),
            ("archon:c2 ring", "archon:c2", {"cp_impl": "ring"})]}),
}
WORLDS = (2, 4)  # torchrun world sizes with layouts
LOSS_CHECK = 2e-2


# -- model and data -------------------------------------------------------------------------------------------
def model_config(suite: str, quick: bool) -> tuple[str, dict]:
    model_type = SUITES[suite][0]
    kw = dict(DENSE_QUICK if quick else DENSE)
    if model_type == "qwen3_moe":
        kw.update(MOE_QUICK if quick else MOE)
    return model_type, kw


def write_model(suite: str, quick: bool, model_dir: Path) -> None:
    """A random HF checkpoint, the same for every run with the same suite / size (fixed seed)."""
    from archon.testing import hf_model, tiny_hf_config

    model_type, kw = model_config(suite, quick)
    hf_model(tiny_hf_config(model_type, **kw), seed=0).save_pretrained(str(model_dir))


def global_batch(suite: str, quick: bool, step: int, vocab: int):
    """The whole step's documents (every layout shards this same batch over its data-parallel ranks)."""
    from archon.engine.batch import PackedBatch

    g = torch.Generator().manual_seed(1000 + step)
    if suite == "cp":
        lengths = [256 if quick else 32768] * 2
    else:
        docs, lo, hi = (8, 8, 64) if quick else (32, 64, 2048)
        lengths = torch.randint(lo, hi + 1, (docs,), generator=g).tolist()
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.1).float().tolist() for n in lengths]
    return PackedBatch.from_sequences(seqs, masks)


# -- one layout -----------------------------------------------------------------------------------------------
def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def gather_params(model, keep: bool) -> dict[str, torch.Tensor] | None:
    """Full float CPU copies of every state-dict tensor; all ranks join each full_tensor, only `keep` stores."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep and full.is_floating_point():
            out[_clean(name)] = full.detach().to("cpu", torch.float32, copy=True)  # never the live tensor
        del full
    return out if keep else None


def train_layout(model_dir: Path, allocation: str, knobs: dict, args, vocab: int, keep: bool) -> dict:
    from archon.config.schema import ActorConfig
    from archon.engine.engine import ArchonEngine
    from archon.train import sft_loss, target_tokens

    cuda = args.device == "cuda"
    actor = ActorConfig(path=str(model_dir), dtype=args.dtype, mb_max_tokens=args.mb_tokens, seed=5)
    actor.optimizer.lr = 1e-4
    actor.optimizer.eps = 1e-6
    actor.archon.enable_compile = False
    actor.archon.attn_impl = "varlen" if cuda else "auto"
    for k, v in knobs.items():
        setattr(actor.archon, k, v)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=args.steps,
                       device="cuda" if cuda else "cpu").initialize()
    try:
        p0 = gather_params(eng.model, keep)
        rank, world = eng.dp_rank_world()
        losses, grad_norms, times, tokens = [], [], [], []
        for step in range(args.steps):
            full = global_batch(args.suite, args.quick, step, vocab)
            mine = full.select(list(range(rank, full.num_seqs, world)))
            _sync(cuda)
            t0 = time.perf_counter()
            stats = eng.train_batch(mine, sft_loss, target_tokens)
            _sync(cuda)
            times.append(time.perf_counter() - t0)
            losses.append(float(stats["loss"]))
            grad_norms.append(float(stats["grad_norm"]))
            tokens.append(full.num_tokens)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        peaks = [peak]
        if dist.is_initialized():
            peaks = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, peak)
        params = gather_params(eng.model, keep)
    finally:
        del eng
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    later = times[1:] or times
    step_s = statistics.median(later)
    return {"losses": losses, "grad_norms": grad_norms, "step_times": times, "tokens": tokens,
            "step1_s": times[0], "step_s": step_s,
            "tokens_per_s": statistics.mean(tokens[1:] or tokens) / step_s,
            "peak_gib_per_rank": [round(float(p), 2) for p in peaks], "p0": p0, "params": params}


# -- comparison -----------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor, denom: torch.Tensor) -> float:
    return float((a - b).norm() / denom.norm().clamp(min=1e-30))


def compare(ref: dict, got: dict) -> dict:
    a_p, b_p, r0, g0 = ref["params"], got["params"], ref["p0"], got["p0"]
    loss_rel = max(abs(b - a) / max(abs(a), 1e-12) for a, b in zip(ref["losses"], got["losses"]))
    gn_rel = max(abs(b - a) / max(abs(a), 1e-12) for a, b in zip(ref["grad_norms"], got["grad_norms"]))
    common = sorted(a_p.keys() & b_p.keys())
    param = {n: _rel(a_p[n], b_p[n], a_p[n]) for n in common if a_p[n].norm() > 0}
    update = {n: _rel(a_p[n], b_p[n], a_p[n] - r0[n]) for n in common if (a_p[n] - r0[n]).norm() > 0}
    init = {n: _rel(r0[n], g0[n], r0[n]) for n in sorted(r0.keys() & g0.keys()) if r0[n].norm() > 0}
    worst_p = max(param, key=param.get) if param else ""
    worst_u = max(update, key=update.get) if update else ""
    return {"loss_rel": loss_rel, "grad_norm_rel": gn_rel,
            "param_rel": param.get(worst_p, float("nan")), "param_worst": worst_p,
            "update_rel": update.get(worst_u, float("nan")), "update_worst": worst_u,
            "update_rel_median": statistics.median(update.values()) if update else float("nan"),
            "init_rel": max(init.values()) if init else float("nan"),
            "missing": sorted(a_p.keys() - b_p.keys()), "extra": sorted(b_p.keys() - a_p.keys()),
            "frozen": sorted(n for n in common if (a_p[n] - r0[n]).norm() == 0)}


def _summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("p0", "params")}


HEADER = (f"{'suite':<6} {'layout':<22}{'loss rel':>10}{'param rel':>11}{'update rel':>11}{'step1 s':>9}"
          f"{'step s':>9}{'tok/s':>11}  peak GiB per rank / worst update tensor")


def row(suite: str, name: str, r: dict) -> str:
    if "error" in r:
        return f"{suite:<6} {name:<22}  ERROR {r['error']}"
    c = r.get("cmp", {})

    def f(k):
        return f"{c[k]:.2e}" if k in c else "-"

    return (f"{suite:<6} {name:<22}{f('loss_rel'):>10}{f('param_rel'):>11}{f('update_rel'):>11}{r['step1_s']:>9.3f}"
            f"{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}  {r['peak_gib_per_rank']} {c.get('update_worst', '')}")


def checks(name: str, r: dict) -> list[str]:
    if "error" in r:
        return [f"CHECK {name}: error {r['error']}"]
    c = r["cmp"]
    out = []
    if not c["loss_rel"] <= LOSS_CHECK:
        out.append(f"CHECK {name}: loss rel diff {c['loss_rel']:.2e} > {LOSS_CHECK:g} "
                   f"(losses {r['losses']} vs reference {c['ref_losses']})")
    if not c["init_rel"] == 0:
        out.append(f"CHECK {name}: initial parameters differ from the reference (max rel {c['init_rel']:.2e})")
    if c["missing"] or c["extra"]:
        out.append(f"CHECK {name}: tensors missing {c['missing'][:5]} extra {c['extra'][:5]}")
    return out


# -- runs -----------------------------------------------------------------------------------------------------
def meta(args) -> dict:
    model_type, kw = model_config(args.suite, args.quick)
    return {"suite": args.suite, "quick": args.quick, "device": args.device, "dtype": args.dtype,
            "steps": args.steps, "mb_tokens": args.mb_tokens, "model_type": model_type, "model": kw}


def run_reference(args, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / f"model_{tag}"
    t0 = time.perf_counter()
    write_model(args.suite, args.quick, model_dir)
    vocab = model_config(args.suite, args.quick)[1]["vocab_size"]
    res = train_layout(model_dir, "archon:d1", {}, args, vocab, keep=True)
    torch.save({"meta": meta(args), **res}, out / f"ref_{tag}.pt")
    print(HEADER)
    print(row(args.suite, "archon:d1 (ref)", res))
    print(json.dumps({"suite": args.suite, "layout": "archon:d1", "meta": meta(args), **_summary(res),
                      "wall_s": time.perf_counter() - t0}))
    print(f"wrote {out / f'ref_{tag}.pt'} and {model_dir}")


def run_layouts(args, out: Path, tag: str) -> int:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda is False:
        torch.set_num_threads(1)
    world = dist.get_world_size()
    model_dir, ref_path, eq_path = out / f"model_{tag}", out / f"ref_{tag}.pt", out / f"eq_{tag}_w{world}.json"
    ref, problem = None, ""
    if rank == 0:
        if world not in WORLDS:
            problem = (f"world size is {world}; the layouts are for 2 or 4 ranks: run with torchrun "
                       f"--nproc-per-node 2 or 4 (or without torchrun for the 1-rank reference)")
        elif not (model_dir / "config.json").is_file() or not ref_path.is_file():
            problem = (f"no reference: {ref_path} / {model_dir} missing; run `python3 {sys.argv[0]} --suite "
                       f"{args.suite} --ref {out}{' --quick' if args.quick else ''} --device {args.device}` first")
        else:
            ref = torch.load(ref_path, map_location="cpu", weights_only=True)
            want, have = meta(args), ref["meta"]
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                problem = f"the reference was made with other settings (reference, now): {diff}"
    flag = [problem]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        if rank == 0:
            print(f"ERROR {flag[0]}", flush=True)
        dist.destroy_process_group()
        return 2
    vocab = model_config(args.suite, args.quick)[1]["vocab_size"]
    results: dict[str, dict] = {}
    if rank == 0:
        results["archon:d1 (ref)"] = _summary(ref)
        print(HEADER)
        print(row(args.suite, "archon:d1 (ref)", ref), flush=True)
    t_all = time.perf_counter()
    for name, alloc, knobs in SUITES[args.suite][1][world]:
        t0 = time.perf_counter()
        try:
            res = train_layout(model_dir, alloc, knobs, args, vocab, keep=rank == 0)
            if rank == 0:
                res["cmp"] = compare(ref, res) | {"ref_losses": ref["losses"]}
        except Exception as e:  # report and go on with the next layout (fails on every rank alike, as a rule)
            print(f"[rank {rank}] {name} failed:\n{traceback.format_exc()}", flush=True)
            res = {"error": f"{type(e).__name__}: {e}"[:300]}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        res["wall_s"] = time.perf_counter() - t0
        res["allocation"], res["knobs"] = alloc, knobs
        if rank == 0:
            results[name] = _summary(res)
            print(row(args.suite, name, res), flush=True)
            for line in checks(name, res):
                print(line, flush=True)
            eq_path.write_text(json.dumps({"meta": meta(args), "world_size": world, "results": results}, indent=1))
        del res
        dist.barrier()
    if rank == 0:
        print()
        print(HEADER)
        for name, r in results.items():
            print(row(args.suite, name, r))
        for name, r in results.items():
            if name != "archon:d1 (ref)":
                for line in checks(name, r):
                    print(line)
        print(json.dumps({"meta": meta(args), "world_size": world,
                          "wall_s": time.perf_counter() - t_all, "results": results}))
        print(f"wrote {eq_path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--ref", required=True, help="output directory: model, reference and result files")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu) | bfloat16 | float32")
    ap.add_argument("--quick", action="store_true", help="tiny model and batch (CPU smoke run)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps")
    ap.add_argument("--mb-tokens", type=int, default=65536, help="micro-batch token budget per rank")
    args = ap.parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    tag = args.suite + ("_quick" if args.quick else "")
    out = Path(args.ref).resolve()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        run_reference(args, out, tag)
        return 0
    return run_layouts(args, out, tag)


if __name__ == "__main__":
    sys.exit(main())
