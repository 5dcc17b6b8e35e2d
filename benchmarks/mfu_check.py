"""Check the per-step `mfu` of `archon train` against `train_throughput.py` on the same run.

Both time the same engine config (`train_throughput.archon_actor`: bf16 compute, fp32 master weights, random
init, compile as `--compile`), one SEQ-token sequence per step, and both count FLOPs with `archon.mfu` and divide
by its peak (spec-sheet dense bf16 TFLOP/s by GPU name; the benchmark's `mfu_spec`, not its table's `MFU`,
which is against a measured matmul peak). Steps:

1. write DIR/model (the benchmark's HF config of --model), DIR/data.jsonl (random SEQ-token documents, one per
   step) and DIR/run.yaml, whose `actor` section is the benchmark's engine config (checked on load);
2. `--compare` then runs `python -m archon train DIR/run.yaml` and `train_throughput.py --engines archon` with the
   same model, shape, compile setting and step counts, each in its own process, and prints both figures
   (medians after the warm-up steps, with each side's fastest and slowest timed step) and their ratio; exit
   status 1 when they differ by more than --tolerance.

Both clocks cover a whole step with the device synchronized at both ends: `archon train` from one step boundary
(the data read included) to the end of the step's last kernel, the benchmark around `train_batch` on a batch
built once. Each process compiles into its own fresh inductor / Triton cache (DIR/cache/train, DIR/cache/bench):
with one shared cache the second process would load the graphs the first one compiled (a compile of seconds
instead of a cold one, its timed steps starting right after it), so the two would not run under the same
conditions.

    python benchmarks/mfu_check.py --out /tmp/mfu --compare                 # one GPU: Qwen3-0.6B, seq 4096, compiled
    python benchmarks/mfu_check.py --out /tmp/mfu --compare --compile both   # compiled, then eager
    python benchmarks/mfu_check.py --out /tmp/mfu --compare --rounds 2       # twice, the benchmark first the 2nd time
    python benchmarks/mfu_check.py --out /tmp/mfu --compare --tiny          # CPU smoke run of the same pipeline
    python benchmarks/mfu_check.py --out /tmp/mfu && archon train /tmp/mfu/run.yaml && \\
        python benchmarks/mfu_check.py --out /tmp/mfu --report
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # train_throughput (and its profiling import) live next to this file


def prepare(out: str, model: str, seq: int, steps: int, warm: int, compile_on: bool, device: str) -> str:
    import yaml
    from archon.config.fields import load_config
    from archon.config.schema import TrainConfig
    from train_throughput import archon_actor, hf_config

    if os.path.exists(os.path.join(out, "run", "metrics.jsonl")):
        sys.exit(f"mfu_check: error: {out}/run/metrics.jsonl exists (archon train appends to it): pass a new --out")
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    cfg = hf_config(model)
    cfg.save_pretrained(model_dir)
    rng = random.Random(0)
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        for _ in range(steps + warm):
            f.write(json.dumps({"input_ids": [rng.randrange(cfg.vocab_size) for _ in range(seq)]}) + "\n")
    actor = archon_actor(model_dir, compile_on)
    run = dict(allocation_mode="archon:d1", total_train_steps=steps + warm, device=device,
               actor=dataclasses.asdict(actor),
               data=dict(task="jsonl", path=os.path.join(out, "data.jsonl"), batch_size=1),
               log=dict(dir=os.path.join(out, "run"), progress_bar=False))
    path = os.path.join(out, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(run, f, sort_keys=False)
    loaded = load_config(TrainConfig, path)
    if loaded.actor != actor:  # what archon train will build must be what the benchmark times
        sys.exit(f"mfu_check: error: {path} does not load back as the benchmark's engine config")
    print(f"wrote {path}; now: archon train {path}", flush=True)
    return path


def report(out: str, warm: int) -> dict:
    """Medians of `archon train`'s metrics after `warm` steps; `step_s`: the timed step the metrics divide by."""
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][warm:]
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("mfu", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_peak_tflops", "step_time")}
    step_s = [r["tokens"] / r["tokens_per_s"] for r in rows]
    med.update(step_s=statistics.median(step_s), step_s_min=min(step_s), step_s_max=max(step_s))
    med["gflop_per_token"] = statistics.median(r["tflops_per_gpu"] / r["tokens_per_s_per_gpu"] * 1e3 for r in rows)
    return med


def run_train(a, out: str, env: dict) -> dict | None:
    """`archon train` on DIR/run.yaml in its own process; the medians of its metrics."""
    print(f"== archon train ({out})", flush=True)
    if subprocess.run([sys.executable, "-m", "archon", "train", os.path.join(out, "run.yaml")],
                      env=fresh_cache(env, out, "train")).returncode != 0:
        print("mfu_check: error: archon train failed", file=sys.stderr)
        return None
    return report(out, a.warm)


def run_bench(a, out: str, env: dict) -> dict | None:
    """`train_throughput.py --engines archon` on the same model, shape, compile setting and step counts."""
    print(f"== train_throughput.py ({out})", flush=True)
    bench_json = os.path.join(out, "train_throughput.json")
    cmd = [sys.executable, "train_throughput.py", "--engines", "archon", "--models", a.model, "--shapes", f"seq{a.seq}",
           "--compile", a.compile, "--steps", str(a.steps), "--warm", str(a.warm), "--device", a.device,
           "--json", bench_json]
    if a.device == "cuda":  # one more step after the timed ones, profiled: its wall time against GPU-busy time
        cmd += ["--profile", os.path.join(out, "profile")]
    if subprocess.run(cmd, cwd=HERE, env=fresh_cache(env, out, "bench")).returncode != 0:
        print("mfu_check: error: train_throughput.py failed", file=sys.stderr)
        return None
    with open(bench_json) as f:
        res = json.load(f)
    (row,) = res["results"]
    if "error" in row:
        print(f"mfu_check: error: train_throughput.py: {row['error']}", file=sys.stderr)
        return None
    tflops = row["flops_per_token"] * row["tokens_per_s_per_gpu"] / 1e12  # unrounded
    return dict(mfu=tflops / res["spec_peak_tflops"], tokens_per_s_per_gpu=row["tokens_per_s_per_gpu"],
                tflops_per_gpu=tflops, mfu_peak_tflops=res["spec_peak_tflops"], step_s=row["step_s"],
                step_s_min=min(row["step_times_s"]), step_s_max=max(row["step_times_s"]),
                gflop_per_token=row["flops_per_token"] / 1e9)


def fresh_cache(env: dict, out: str, name: str) -> dict:
    """`env` with an empty compile cache of this process's own (see the module doc)."""
    d = os.path.join(out, "cache", name)
    if os.path.exists(d):
        sys.exit(f"mfu_check: error: {d} exists (a compile cache of an earlier run): pass a new --out")
    os.makedirs(d)
    return dict(env, TORCHINDUCTOR_CACHE_DIR=d, TRITON_CACHE_DIR=os.path.join(d, "triton"))


def compare(a) -> int:
    # the benchmark runs from benchmarks/: a relative PYTHONPATH (packages/*/src) must still find archon
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p))
    rounds = []  # (archon train, benchmark) per round; odd rounds run the benchmark first
    for i in range(a.rounds):
        out = a.out if a.rounds == 1 else os.path.join(a.out, f"round_{i}")
        prepare(out, a.model, a.seq, a.steps, a.warm, a.compile == "on", a.device)
        order = (run_train, run_bench) if i % 2 == 0 else (run_bench, run_train)
        got = {}
        for fn in order:
            got[fn] = fn(a, out, env)
            if got[fn] is None:
                return 2
        rounds.append((got[run_train], got[run_bench]))
    train_r, bench_r = [r[0] for r in rounds], [r[1] for r in rounds]
    same_peak = all(abs(t["mfu_peak_tflops"] - b["mfu_peak_tflops"]) < 1e-9 for t, b in rounds)
    # on CPU each process measures its own peak: compare achieved TFLOP/s (the same FLOPs count) instead
    key = "mfu" if same_peak else "tflops_per_gpu"
    ratio = statistics.median(t[key] for t in train_r) / statistics.median(b[key] for b in bench_r)
    print(f"\n{'':<24}{'step s':>9}{'min':>8}{'max':>8}{'tok/s/gpu':>12}{'GFLOP/tok':>11}{'TFLOP/s':>10}"
          f"{'peak':>9}{'MFU':>8}")
    for i, (train, bench) in enumerate(rounds):
        for name, r in (("archon train", train), ("train_throughput.py", bench)):
            name += f" [{i}]" if a.rounds > 1 else ""
            print(f"{name:<24}{r['step_s']:>9.4f}{r['step_s_min']:>8.4f}{r['step_s_max']:>8.4f}"
                  f"{r['tokens_per_s_per_gpu']:>12.0f}{r['gflop_per_token']:>11.4g}"
                  f"{r['tflops_per_gpu']:>10.4g}{r['mfu_peak_tflops']:>9.4g}{r['mfu']:>8.2%}")
    ok = abs(ratio - 1) <= a.tolerance
    # step_time: train_batch alone, up to its read of the step's stats, which waits for every kernel of the step
    # (the optimizer's too: the read is queued after them); the step's clock adds the data read before it
    print(f"{key} ratio archon train / train_throughput.py: {ratio:.3f}"
          f"{f' (medians over {a.rounds} rounds)' if a.rounds > 1 else ''} "
          f"({'within' if ok else 'NOT within'} {a.tolerance:.0%}); archon train's engine step_time "
          f"{statistics.median(t['step_time'] for t in train_r):.4f} s (train_batch without the data read)")
    for prof in sorted(glob.glob(os.path.join(a.out, "**", "profile", "profile_*.txt"), recursive=True)):
        with open(prof) as f:  # "TAG: wall .. ms (profiled), GPU kernels busy .. ms" and the GPU idle gaps
            print("train_throughput.py profiled step: " + "; ".join(f.readline().strip() for _ in range(2)))
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump(dict(rounds=[dict(archon_train=t, train_throughput=b) for t, b in rounds], ratio_key=key,
                       ratio=ratio, within=ok, model=a.model, seq=a.seq, compile=a.compile, device=a.device), f,
                  indent=1)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="a train_throughput.py model (default qwen3-0.6b; --tiny: qwen3-tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per step (default 4096; --tiny: 256)")
    p.add_argument("--compile", choices=["on", "off", "both"], default=None,
                   help="torch.compile the blocks (default on, archon train's default on CUDA; --tiny: off); "
                        "both: --compare each setting, in DIR/compile_on and DIR/compile_off")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: qwen3-tiny, 256 tokens, eager")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--rounds", type=int, default=1,
                   help="--compare this many times, each in DIR/round_N, the benchmark first in odd rounds; the ratio "
                        "is of the medians over rounds (back-to-back processes on a shared host differ by more "
                        "than the tolerance at times: a host-bound step follows the host's load)")
    p.add_argument("--report", action="store_true", help="print the medians of DIR/run's metrics")
    p.add_argument("--compare", action="store_true", help="run archon train and train_throughput.py, compare")
    a = p.parse_args()
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    a.out = os.path.abspath(a.out)  # the benchmark runs from benchmarks/
    a.device = "cpu" if a.tiny else "cuda"
    a.model = a.model or ("qwen3-tiny" if a.tiny else "qwen3-0.6b")
    a.seq = a.seq or (256 if a.tiny else 4096)
    a.compile = a.compile or ("off" if a.tiny else "on")
    if a.report:
        print(json.dumps({k: round(v, 4) for k, v in report(a.out, a.warm).items()}))
        return 0
    if a.compare and a.compile == "both":
        out, codes = a.out, []
        for c in ("on", "off"):
            codes.append(compare(argparse.Namespace(**{**vars(a), "compile": c, "out": os.path.join(out, f"compile_{c}")})))
        return max(codes)
    if a.compare:
        return compare(a)
    if a.compile == "both":
        p.error("--compile both needs --compare")
    prepare(a.out, a.model, a.seq, a.steps, a.warm, a.compile == "on", a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
