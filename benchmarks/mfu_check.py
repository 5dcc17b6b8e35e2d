"""Check the per-step `mfu` of `archon train` against `train_throughput.py` on the same model and shape.

Writes DIR/run.yaml, the Qwen3-0.6B config and DIR/data.jsonl (random 4096-token documents, one per step), the
same run `train_throughput.py --models qwen3-0.6b --shapes seq4096 --compile off --engines archon` times
(bf16 compute, fp32 master weights, one 4096-token sequence per step, random init); `--report` prints the
median `mfu` / `tokens_per_s_per_gpu` of the metrics after the warm-up steps. Both divide by the same peak
(`archon.mfu`: spec-sheet dense bf16 TFLOP/s by GPU name; the benchmark's `mfu_spec` column).

    cd benchmarks && python train_throughput.py --models qwen3-0.6b --shapes seq4096 --compile off --engines archon
    python benchmarks/mfu_check.py --out /tmp/mfu && archon train /tmp/mfu/run.yaml && \\
        python benchmarks/mfu_check.py --out /tmp/mfu --report
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics

VOCAB = 151936
QWEN3_0_6B = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)


def prepare(out: str, steps: int, warm: int) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(QWEN3_0_6B, f, indent=1)
    rng = random.Random(0)
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        for _ in range(steps + warm):
            f.write(json.dumps({"input_ids": [rng.randrange(VOCAB) for _ in range(4096)]}) + "\n")
    run = f"""allocation_mode: archon:d1
total_train_steps: {steps + warm}
device: cuda
actor:
  path: {out}/config.json
  dtype: bfloat16
  mb_max_tokens: 16384
  optimizer: {{lr: 1.0e-5}}
data: {{task: jsonl, path: {out}/data.jsonl, batch_size: 1}}
log: {{dir: {out}/run, progress_bar: false}}
"""
    with open(os.path.join(out, "run.yaml"), "w") as f:
        f.write(run)
    print(f"wrote {out}/run.yaml; now: archon train {out}/run.yaml")


def report(out: str, warm: int) -> None:
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][warm:]
    print(json.dumps({k: round(statistics.median(r[k] for r in rows), 4)
                      for k in ("mfu", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_peak_tflops", "step_time")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    report(a.out, a.warm) if a.report else prepare(a.out, a.steps, a.warm)


if __name__ == "__main__":
    main()
