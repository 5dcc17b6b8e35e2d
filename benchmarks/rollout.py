"""Rollout throughput: Archon's rollout engine vs Hugging Face `generate` on one GPU, measured in the same run.

Random-init Qwen3 models (0.6B- and 1.7B-shaped, bf16), random prompts, sampling at temperature 1 with no stop
token, so every row makes exactly --new-tokens tokens. Peers: HF `generate` eager (dynamic cache, SDPA) and HF
`generate` with its static cache + torch.compile (`cache_implementation="static"`, compile mode from
--hf-compile-modes, tried in order until one runs). Each engine runs the workload once to warm up (graph
capture, compilation) and once timed. Reported: new tokens/s, peak memory, and % of the HBM bandwidth bound
(bytes a decode step must read: the weights once plus every row's KV cache up to its position, over the
measured device-to-device copy bandwidth). `--grpo` adds GRPO groups (8 samples sharing one prompt) with and
without shared prompt prefixes. Engines: `archon` (the engine's defaults: fused Triton decode ops, steps captured
as CUDA graphs), `archon-unfused` (the model's own forward captured as CUDA graphs), `archon-compiled` (the
model's forward compiled by inductor, then captured), `archon-sdpa`, `archon-no-graphs`, `hf-eager`, `hf-compile`; GRPO shared prompts use cascade attention (one K/V copy per group) and, last, per-row
copies (`archon-copy-prefix`). Every case frees the previous one's cache first and prints its wall time.

    python benchmarks/rollout.py --suite                           # the headline cases, one GPU, < 9 minutes
    python benchmarks/rollout.py                                   # the full matrix (long)
    python benchmarks/rollout.py --models qwen3-0.6b --batches 64 --prompts 256 --grpo
    python benchmarks/rollout.py --engines archon --hf-new-tokens 64  # HF timed on fewer new tokens
    python benchmarks/rollout.py --suite --tiny                    # a tiny model on CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

CONFIGS = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen3-moe-small": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, num_experts=64,
                            num_experts_per_tok=8, moe_intermediate_size=384, decoder_sparse_step=1,
                            mlp_only_layers=[], norm_topk_prob=True),
}
CONFIGS["tiny"] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
VOCAB = 151936
TINY_VOCAB = 512
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def hf_config(name: str):
    from transformers import Qwen3Config, Qwen3MoeConfig

    cls = Qwen3MoeConfig if "moe" in name else Qwen3Config
    vocab = TINY_VOCAB if name == "tiny" else VOCAB
    return cls(vocab_size=vocab, max_position_embeddings=40960, rope_theta=1e6, **CONFIGS[name])


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop the previous case's cache, graph pool and compiled graphs before the next case."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE == "cuda" else None


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(2**30 if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    sync()
    return 2 * a.numel() * 20 / (time.perf_counter() - t)


def bound_tokens_per_s(weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt: int, new: int,
                       bandwidth: float, slots: int, prompt_readers: int = 1) -> float:
    """New tokens/s if every decode step only read the weights once and each running row's KV up to its
    position, at ``bandwidth``. With fewer slots than rows the batch runs in waves of ``slots`` rows.
    ``prompt_readers``: rows that read one copy of a prompt's KV (the group size under cascade attention)."""
    waves, total_bytes = -(-batch // slots), 0.0
    left = batch
    for _ in range(waves):
        rows = min(slots, left)
        left -= rows
        mean_ctx = prompt / prompt_readers + (new - 1) / 2
        total_bytes += new * weight_bytes + rows * new * mean_ctx * kv_bytes_per_token
    return batch * new / (total_bytes / bandwidth)


def prompts_for(batch: int, prompt_len: int, group: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    unique = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch // group)]
    return [p for p in unique for _ in range(group)]


def build_archon(name: str):
    from archon.hf import build_model

    model = build_model(hf_config(name), device="meta", dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    model.to_empty(device=DEVICE)
    model.init_weights()
    return model.eval()


def run_archon(model, name: str, prompts: list[list[int]], new: int, share: bool, kv_gb: float | None,
               graphs: bool, profile: bool = False, attention: str = "matmul", warm_new: int | None = None,
               compile_decode: bool = False, cascade: bool = False, kernels: str = "auto") -> dict:
    from archon.rl import build_rollout_engine
    from archon_rl import GenRequest, SamplingConfig

    free_memory()
    graphs = graphs and DEVICE == "cuda"
    # on CPU (--tiny) the compiled path is traced by aot_eager: inductor's C++ build takes minutes there
    engine = build_rollout_engine(model, kv_cache_gb=kv_gb, share_prefixes=share, cuda_graphs=graphs,
                                  max_batch=len(prompts), decode_attention=attention, compile_decode=compile_decode,
                                  cascade=cascade and share, kernels=kernels,
                                  compile_backend="inductor" if DEVICE == "cuda" else "aot_eager")
    cfg = SamplingConfig(max_new_tokens=new, temperature=1.0)
    reqs = [GenRequest(p, cfg, seed=i) for i, p in enumerate(prompts)]
    t = time.perf_counter()
    warm_cfg = SamplingConfig(max_new_tokens=warm_new or new, temperature=1.0)
    engine.generate([GenRequest(p, warm_cfg, seed=i) for i, p in enumerate(prompts)])  # capture, compile, allocate
    sync()
    warm = time.perf_counter() - t
    engine.stats = {k: 0 for k in engine.stats}
    t = time.perf_counter()
    out = engine.generate(reqs)
    sync()
    dt = time.perf_counter() - t
    assert all(len(r.output_ids) == new for r in out)
    if profile:  # where a decode step's time goes: a short run under the profiler, kernels by device time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        short = [GenRequest(p, SamplingConfig(max_new_tokens=32, temperature=1.0), seed=i)
                 for i, p in enumerate(prompts)]
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(short)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60),
              flush=True)
    compiled = engine.runner.compiled is not None and not engine.runner.compiled.failed
    step = "/compiled" if compiled else ("/fused-" + engine.kernels.name if engine.kernels else "/model-forward")
    res = dict(engine="archon" + ("" if graphs else "/no-graphs") + step
               + ("/cascade" if cascade and share else "") + ("" if share else "/no-share")
               + ("" if attention == "matmul" else f"/{attention}-attn"), seconds=dt,
               warmup_s=round(warm, 1), new_tokens=len(prompts) * new, slots=engine.num_slots,
               kv_cache_gb=round(engine.cache.nbytes() / 2**30, 1), prefill_tokens=engine.stats["prefill_tokens"],
               graphs=len(getattr(engine.runner, "graphs", {})))
    del engine
    return res


def run_hf(name: str, prompts: list[list[int]], new: int, compile_mode: str | None) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.generation.configuration_utils import CompileConfig

    free_memory()
    cfg = hf_config(name)
    cfg._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    model.eval()
    ids = torch.tensor(prompts, device=DEVICE)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=True,
              temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    if compile_mode is not None:
        backend = "inductor" if DEVICE == "cuda" else "aot_eager"
        kw.update(cache_implementation="static",
                  compile_config=CompileConfig(mode=compile_mode, fullgraph=True, backend=backend))
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kw)
    sync()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    sync()
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new
    engine = "hf/eager" if compile_mode is None else f"hf/static+compile({compile_mode})"
    res = dict(engine=engine, seconds=dt, warmup_s=round(warm, 1), new_tokens=len(prompts) * new)
    del model
    return res


def finish(res: dict, name: str, batch: int, prompt: int, new: int, group: int, bw: float, weight_bytes: int,
           kv_bpt: int) -> dict:
    res.update(model=name, batch=batch, prompt=prompt, new=new, group=group, device=device_name())
    res["tokens_per_s"] = round(res["new_tokens"] / res["seconds"])
    res["peak_mem_gb"] = peak_gb()
    slots = res.get("slots", batch)
    readers = group if "/cascade" in res["engine"] else 1  # cascade reads a group's prompt KV once
    res["pct_hbm_bound"] = round(100 * res["tokens_per_s"] / bound_tokens_per_s(
        weight_bytes, kv_bpt, batch, prompt, new, bw, slots, readers), 1)
    res["seconds"] = round(res["seconds"], 2)
    return res


SUITE = dict(models=["qwen3-0.6b"], batches=[64], prompts=[256], new_tokens=512, grpo=True, group_size=8,
             grpo_prompt=2048, grpo_batch=64, hf_new_tokens=None, hf_compile_modes=["reduce-overhead", "default"],
             time_budget=420, engines=["archon", "archon-unfused", "hf-eager", "hf-compile"])
TINY = dict(models=["tiny"], batches=[4], prompts=[16], new_tokens=8, group_size=4, grpo_prompt=32, grpo_batch=8,
            hf_new_tokens=4)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true",
                   help="the headline cases in one run (< 9 minutes on an H100): qwen3-0.6b batch 64 prompt 256, 512 "
                        "new tokens: archon fused / unfused, HF eager and HF static+compile on the same workload, "
                        "then GRPO 8 groups x 8 samples at prompt 2048: shared prefixes by cascade attention, "
                        "unshared, shared by per-row copies (cases starting after 420 s are skipped)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and shapes (runs on CPU in fp32)")
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"], choices=list(CONFIGS))
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    p.add_argument("--prompts", nargs="+", type=int, default=[256, 2048], help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--engines", nargs="+", default=["archon", "hf-eager", "hf-compile"],
                   choices=["archon", "archon-unfused", "archon-compiled", "archon-sdpa", "archon-no-graphs", "hf-eager",
                            "hf-compile"],
                   help="archon: fused Triton decode ops captured as CUDA graphs (the defaults); archon-unfused: the "
                        "model's own forward captured; archon-compiled: that forward compiled by inductor, then "
                        "captured; archon-sdpa: unfused with SDPA decode attention")
    p.add_argument("--hf-compile-modes", nargs="+", default=["reduce-overhead", "default"],
                   help="torch.compile modes tried in order for HF's static-cache path until one runs")
    p.add_argument("--hf-new-tokens", type=int, default=None,
                   help="time HF peers on this many new tokens instead of --new-tokens (they are slow)")
    p.add_argument("--hf-max-batch-prompt", type=int, default=64 * 2048,
                   help="skip HF peers when batch x prompt exceeds this (their caches do not fit)")
    p.add_argument("--grpo", action="store_true",
                   help="also: groups of --group-size samples sharing one prompt, shared prefixes on and off")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--grpo-prompt", type=int, default=2048)
    p.add_argument("--grpo-batch", type=int, default=64)
    p.add_argument("--no-cascade", action="store_true",
                   help="GRPO shared prompts copied into every row's slot instead of cascade attention over one "
                        "copy per group (by default both run, cascade first)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="Archon cache budget (default: 90%% of free)")
    p.add_argument("--warmup-new-tokens", type=int, default=None,
                   help="Archon warm-up run on this many new tokens (default: the full workload); graphs of "
                        "longer cache buckets are then captured inside the timed run")
    p.add_argument("--profile", action="store_true", help="print a kernel profile of each Archon run")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later runs are skipped after it")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "rollout.json"))
    a = p.parse_args()
    for preset in ([SUITE] if a.suite else []) + ([TINY] if a.tiny else []):
        for k, v in preset.items():
            setattr(a, k, v)
    if a.tiny and a.kv_cache_gb is None:
        a.kv_cache_gb = 0.05
    return a


def cases(a: argparse.Namespace) -> list[tuple[str, int, int, int, bool]]:
    """(engine, batch, prompt, group, share) in run order: the batch cases, GRPO shared and unshared, then GRPO
    with per-row prefix copies (the time budget cuts from the end)."""
    out = [(e, b, pl, 1, True) for b in a.batches for pl in a.prompts for e in a.engines]
    if a.grpo:
        out += [("archon", a.grpo_batch, a.grpo_prompt, a.group_size, s) for s in (True, False)]
    if a.grpo and not a.no_cascade:  # shared prompts copied into every row's slot (no cascade), if time is left
        out.append(("archon-copy-prefix", a.grpo_batch, a.grpo_prompt, a.group_size, True))
    return out


def main() -> None:
    a = parse_args()
    import transformers

    t_start = time.time()
    bw = copy_bandwidth()
    print(f"torch {torch.__version__} transformers {transformers.__version__} {device_name()} "
          f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    if a.hf_new_tokens and a.hf_new_tokens != a.new_tokens:
        print(f"note: HF peers are timed on {a.hf_new_tokens} new tokens per row, Archon on {a.new_tokens}",
              flush=True)
    rows: list[dict] = []

    def record(r: dict) -> None:
        rows.append(r)
        print(json.dumps(r), flush=True)

    for name in a.models:
        model = build_archon(name)
        weight_bytes = sum(t.numel() * t.element_size() for t in {id(q): q for q in model.parameters()}.values())
        from archon.rl import decoder_cache_layout

        kv_bpt = decoder_cache_layout(model).bytes_per_token()
        vocab = TINY_VOCAB if name == "tiny" else VOCAB
        for eng, batch, plen, group, share in cases(a):
            prompts = prompts_for(batch, plen, group, vocab)
            if time.time() - t_start > a.time_budget:
                record(dict(engine=eng, model=name, batch=batch, prompt=plen, group=group, skipped="time budget"))
                continue
            new = a.new_tokens
            t_case = time.time()
            try:
                if eng.startswith("archon"):
                    r = run_archon(model, name, prompts, new, share, a.kv_cache_gb, eng != "archon-no-graphs",
                                   a.profile and eng != "archon-no-graphs",
                                   "sdpa" if eng == "archon-sdpa" else "matmul", a.warmup_new_tokens,
                                   compile_decode=eng == "archon-compiled",
                                   cascade=group > 1 and not a.no_cascade and eng != "archon-copy-prefix",
                                   kernels="none" if eng in ("archon-unfused", "archon-sdpa", "archon-compiled")
                                   else "auto")
                else:
                    if batch * plen > a.hf_max_batch_prompt:
                        record(dict(engine=eng, model=name, batch=batch, prompt=plen, skipped="too large"))
                        continue
                    new = a.hf_new_tokens or new
                    model.cpu()  # make room for the HF model
                    r = None
                    for mode in ([None] if eng == "hf-eager" else a.hf_compile_modes):
                        try:
                            r = run_hf(name, prompts, new, mode)
                            break
                        except Exception as ex:  # e.g. the CUDA-graph "overwritten tensor" error
                            print(f"hf compile mode {mode} failed: {repr(ex)[:300]}", flush=True)
                            torch._dynamo.reset()
                            if mode == (a.hf_compile_modes[-1] if eng == "hf-compile" else None):
                                raise
                    model.to(DEVICE)
                r = finish(r, name, batch, plen, new, group, bw, weight_bytes, kv_bpt)
                r["case_wall_s"] = round(time.time() - t_case, 1)
                record(r)
            except Exception as ex:  # report and go on: one failing shape must not hide the rest
                model.to(DEVICE)
                record(dict(engine=eng, model=name, batch=batch, prompt=plen, group=group, error=repr(ex)[:400],
                            case_wall_s=round(time.time() - t_case, 1)))
            print(f"case {eng} batch {batch} prompt {plen} group {group}{'' if share else ' unshared'}: "
                  f"{time.time() - t_case:.1f} s wall ({time.time() - t_start:.0f} s total)", flush=True)
        del model
        free_memory()
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    print_table(rows)
    print(f"total wall time {time.time() - t_start:.0f} s", flush=True)


def print_table(rows: list[dict]) -> None:
    eager = {(r["model"], r["batch"], r["prompt"]): r for r in rows if r.get("engine") == "hf/eager"}
    print(f"\n{'model':<16} {'batch':>5} {'prompt':>6} {'grp':>3} {'engine':<40} {'new':>4} {'tok/s':>8} "
          f"{'%HBM':>5} {'mem GB':>6} {'vs HF eager':>11} {'wall s':>6}")
    for r in rows:
        head = f"{r['model']:<16} {r['batch']:>5} {r['prompt']:>6} {r.get('group', 1):>3} {r['engine']:<40}"
        if "tokens_per_s" not in r:
            print(f"{head} {r.get('error') or r.get('skipped')}"[:160])
            continue
        peer = eager.get((r["model"], r["batch"], r["prompt"]))
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.1f}x" if peer and r.get("group", 1) == 1 else "-"
        print(f"{head} {r['new']:>4} {r['tokens_per_s']:>8} {r['pct_hbm_bound']:>5} {str(r['peak_mem_gb']):>6} "
              f"{ratio:>11} {r.get('case_wall_s', '-'):>6}")
    grpo = [r for r in rows if r.get("group", 1) > 1 and "tokens_per_s" in r]
    unshared = next((r for r in grpo if r["engine"].endswith("/no-share")), None)
    for r in grpo:
        if unshared is not None and r is not unshared:
            print(f"GRPO {r['engine']} / unshared: {r['tokens_per_s'] / unshared['tokens_per_s']:.2f}x "
                  f"(prefill tokens {r['prefill_tokens']} vs {unshared['prefill_tokens']})")


if __name__ == "__main__":
    main()
