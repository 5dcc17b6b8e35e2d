#!/usr/bin/env bash
# Every single-GPU benchmark plus the single-GPU tests, one job per GPU in parallel (a 4-GPU host).
# Each job owns its GPU (CUDA_VISIBLE_DEVICES), so timings are not shared; logs land in $OUT/single/
# and are packed into $OUT/single.tgz at the end.
#   bash benchmarks/gpu_single.sh [LIMIT_SECONDS]
set -u
export PYTHONPATH=$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1
LIMIT=${1:-520}
OUT=${OUT:-/tmp/archon_out}
D=$OUT/single
mkdir -p "$D"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$D/gpus.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$D/gpus.txt"
job() {  # job GPU NAME CMD...
  local gpu=$1 name=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpu timeout "$LIMIT" "$@" > "$D/$name.log" 2>&1; echo "exit $?" >> "$D/$name.log" ) &
}
T=benchmarks/train_throughput.py
job 0 tp_1.7b_seq4096 python3 $T --models qwen3-1.7b --shapes seq4096 --json "$D/tp_1.7b_seq4096.json" --profile "$D/prof"
job 1 tp_1.7b_packed_attn_tests bash -c "python3 $T --models qwen3-1.7b --shapes packed16k --json $D/tp_1.7b_packed.json;
  python3 benchmarks/attention_varlen.py; python3 benchmarks/lm_head.py; python3 -m pytest -m gpu -q --timeout 300 -p no:cacheprovider packages tests"
job 2 tp_0.6b python3 $T --models qwen3-0.6b --json "$D/tp_0.6b.json"
job 3 tree python3 benchmarks/tree_training.py --json "$D/tree.json"
wait
for f in "$D"/*.log; do echo "=== $f"; tail -n 40 "$f"; done
tar czf "$OUT/single.tgz" -C "$OUT" single && rm -rf "$D"
