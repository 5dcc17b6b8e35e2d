"""Training throughput: Archon vs Hugging Face transformers on one GPU, measured in the same run.

Same Qwen3 config, same random tokens, bf16 compute with fp32 master weights and fused AdamW for both.
Prints one JSON line per measurement and a table: tokens/s, MFU against the measured bf16 matmul peak
(`mfu_spec`, the table's `spec` column: against the spec-sheet peak of `archon.mfu`, as in `archon train`'s
metrics; FLOPs per token from `archon.mfu` for both),
peak memory and step time; ratios are against the HF peer of the same model/shape/compile setting.

    python benchmarks/train_throughput.py                       # 0.6B + 1.7B, seq 4096 + packed 16K
    python benchmarks/train_throughput.py --models qwen3-1.7b --shapes seq4096 --compile on
    python benchmarks/train_throughput.py --device cpu --models qwen3-tiny --shapes seq256 --compile off --engines archon
    torchrun --nproc-per-node 4 benchmarks/train_throughput.py --models qwen3-1.7b --fsdp   # per-GPU numbers
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from profiling import profile_step  # benchmarks/profiling.py (scripts run from benchmarks/)

CONFIGS = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # a smoke-test shape for CPU (`--device cpu`, `benchmarks/mfu_check.py --tiny`)
    "qwen3-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, vocab_size=512),
}
VOCAB = 151936  # unless the config names its own


def peak_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


def model_flops_per_token(name: str, attn_len: float) -> float:
    """Training FLOPs per token as `archon train`'s metrics count them (`archon.mfu.flops_per_token`: 6N with the
    LM head and without the embedding lookup, plus causal attention over documents of mean length attn_len)."""
    from archon.hf import build_model
    from archon.mfu import flops_per_token

    return flops_per_token(build_model(hf_config(name), device="meta").args, attn_len)


def doc_lengths(shape: str, gen: torch.Generator) -> list[int]:
    if shape.startswith("seq"):  # seqN: one N-token sequence
        return [int(shape[3:])]
    total, out = 16384, []  # packed: mixed-length documents totalling 16K tokens
    while sum(out) < total:
        out.append(int(torch.randint(128, 3072, (1,), generator=gen)))
    out[-1] -= sum(out) - total
    return [n for n in out if n > 0]


def mean_attn_len(lengths: list[int]) -> float:
    return sum(n * n for n in lengths) / sum(lengths)


def hf_config(name: str):
    from transformers import Qwen3Config

    return Qwen3Config(**{"vocab_size": VOCAB, "max_position_embeddings": 40960, "rope_theta": 1e6, **CONFIGS[name]})


def archon_actor(path: str, compile_on: bool, scope: str = "block", mode: str = "default"):
    """The engine config timed here (bf16 compute, fp32 master weights, random init); `mfu_check.py` writes the
    same one into the `archon train` run it compares against."""
    from archon.config.schema import ActorConfig

    actor = ActorConfig(path=path, init_from_scratch=True, dtype="bfloat16", mb_max_tokens=16384)
    actor.optimizer.lr = 1e-5
    actor.archon.enable_compile = compile_on
    actor.archon.compile_scope = scope
    actor.archon.compile_mode = "default" if mode == "cpp-wrapper" else mode
    actor.archon.compile_cpp_wrapper = mode == "cpp-wrapper"
    return actor


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_archon(name: str, shape: str, compile_on: bool, steps: int, warm: int, allocation: str,
               profile_dir: str | None = None, scope: str = "block", mode: str = "default",
               device: str = "cuda") -> dict:
    from archon.engine.batch import PackedBatch
    from archon.engine.engine import ArchonEngine
    from archon.train import sft_loss, target_tokens

    d = tempfile.mkdtemp()
    cfg = hf_config(name)
    cfg.save_pretrained(d)
    actor = archon_actor(d, compile_on, scope, mode)
    eng = ArchonEngine(actor, allocation_mode=allocation, total_steps=warm + steps, device=device).initialize()
    gen = torch.Generator().manual_seed(0)
    lengths = doc_lengths(shape, gen)
    world = eng.dims.dp_cp
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    batch = PackedBatch.from_sequences(seqs)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warm + steps):
        sync(device)
        t = time.perf_counter()
        eng.train_batch(batch, sft_loss, target_tokens)
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    if int(os.environ.get("RANK", "0")) == 0:
        profile_step(lambda: eng.train_batch(batch, sft_loss, target_tokens),
                     f"archon_{name}_{shape}_{f'compiled_{scope}_{mode}' if compile_on else 'eager'}", profile_dir)
    tokens = sum(lengths)
    from archon.config.validate import compile_scope

    label = f"archon/{compile_scope(actor, eng.dims, eng.device)}" + ("" if mode == "default" else f"/{mode}")
    fpt = model_flops_per_token(name, mean_attn_len(lengths))
    res = dict(engine="archon" if not compile_on else label, model=name, shape=shape, compile=compile_on, layout=allocation,
               step_s=round(med, 4), tokens_per_s_per_gpu=round(tokens / med), flops_per_token=fpt,
               tflops=round(fpt * tokens / med / 1e12, 4),
               peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else 0.0,
               world=world, step_times_s=[round(x, 5) for x in times])
    eng = None  # free GPU memory before the next run
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def run_hf(name: str, shape: str, compile_on: bool, steps: int, warm: int, profile_dir: str | None = None) -> dict:
    from transformers import Qwen3ForCausalLM

    cfg = hf_config(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fwd = torch.compile(model) if compile_on else model
    gen = torch.Generator().manual_seed(0)
    lengths = doc_lengths(shape, gen)
    tokens = sum(lengths)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=gen).cuda()
    kwargs = {}
    if len(lengths) > 1:  # HF packed form: position ids restart per document (flash/sdpa varlen detection)
        kwargs["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(input_ids=ids, labels=ids, **kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warm + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    profile_step(step, f"hf_{name}_{shape}_{'compiled' if compile_on else 'eager'}", profile_dir)
    res = dict(engine="hf", model=name, shape=shape, compile=compile_on, step_s=round(med, 4),
               tokens_per_s_per_gpu=round(tokens / med),
               tflops=round(model_flops_per_token(name, mean_attn_len(lengths)) * tokens / med / 1e12, 4),
               peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    model = opt = fwd = None  # free GPU memory before the next run
    torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"], choices=list(CONFIGS))
    p.add_argument("--shapes", nargs="+", default=["seq4096", "packed16k"])
    p.add_argument("--compile", choices=["on", "off", "both"], default="both")
    p.add_argument("--engines", nargs="+", default=["hf", "archon"])
    p.add_argument("--scopes", nargs="+", default=["block"], choices=["block", "stack"],
                   help="Archon compile scopes to time when compile is on (each is one row)")
    p.add_argument("--modes", nargs="+", default=["default"],
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "cpp-wrapper"],
                   help="Archon torch.compile modes to time when compile is on (each is one row); cpp-wrapper: "
                        "the default mode with compile_cpp_wrapper (refused on CUDA by rule compile-cpp-wrapper-cuda: "
                        "inductor failed on an H100)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: Archon with archon:dN (HF skipped)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile one more step of each run and write kernel tables to DIR")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "train_throughput.json"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of the Archon engine (HF skipped; peak = a measured fp32 matmul)")
    a = p.parse_args()
    if a.device == "cpu" and (a.engines != ["archon"] or world_size() > 1):
        p.error("--device cpu times the Archon engine on one process only: pass --engines archon")
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    allocation = f"archon:d{world}" if a.fsdp or world > 1 else "archon:d1"
    import transformers
    from archon.mfu import device_peak_tflops

    # spec_peak: what `archon train`'s metrics divide by (their `mfu`); this table's `MFU` is against `peak`
    spec_peak, _ = device_peak_tflops(torch.device(a.device))
    peak = peak_matmul_tflops() if a.device == "cuda" else spec_peak
    if rank == 0:
        gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        print(f"torch {torch.__version__} transformers {transformers.__version__} {gpu} "
              f"peak matmul {peak:.1f} TFLOP/s (spec {spec_peak:.1f})", flush=True)
    compiles = {"on": [True], "off": [False], "both": [False, True]}[a.compile]
    rows = []
    for name in a.models:
        for shape in a.shapes:
            for c in compiles:
                runs = [(eng, scope, mode) for eng in a.engines
                        for scope in (a.scopes if eng == "archon" and c else ["block"])
                        for mode in (a.modes if eng == "archon" and c else ["default"])]
                for eng, scope, mode in runs:
                    if eng == "hf" and world > 1:
                        continue
                    try:
                        r = (run_hf(name, shape, c, a.steps, a.warm, a.profile) if eng == "hf"
                             else run_archon(name, shape, c, a.steps, a.warm, allocation, a.profile, scope, mode,
                                             a.device))
                    except Exception as ex:  # report and go on: one failing shape must not hide the rest
                        r = dict(engine=eng, model=name, shape=shape, compile=c, error=repr(ex)[:400])
                    r["mfu"] = round(r.get("tflops", 0.0) / peak, 4)
                    r["mfu_spec"] = round(r.get("tflops", 0.0) / spec_peak, 4)
                    rows.append(r)
                    if rank == 0:
                        print(json.dumps(r), flush=True)
    if rank == 0:
        peers = {(r["model"], r["shape"], r["compile"]): r for r in rows if r["engine"] == "hf" and "error" not in r}
        print(f"\n{'model':<11} {'shape':<10} {'compile':<7} {'engine':<28} {'tok/s/gpu':>10} {'MFU':>6} "
              f"{'spec':>6} {'mem GB':>7} {'step s':>7} {'vs HF':>6}")
        for r in rows:
            if "error" in r:
                print(f"{r['model']:<11} {r['shape']:<10} {r['compile']!s:<7} {r['engine']:<28} ERROR {r['error'][:80]}")
                continue
            peer = peers.get((r["model"], r["shape"], r["compile"]))
            ratio = f"{r['tokens_per_s_per_gpu'] / peer['tokens_per_s_per_gpu']:.2f}" if peer else "-"
            print(f"{r['model']:<11} {r['shape']:<10} {r['compile']!s:<7} {r['engine']:<28} "
                  f"{r['tokens_per_s_per_gpu']:>10} {r['mfu']:>6.1%} {r['mfu_spec']:>6.1%} {r['peak_mem_gb']:>7} {r['step_s']:>7} {ratio:>6}")
        with open(a.json, "w") as f:
            json.dump(dict(peak_tflops=peak, spec_peak_tflops=spec_peak, torch=torch.__version__, results=rows), f,
                      indent=1)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main()
