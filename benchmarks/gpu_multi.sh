#!/usr/bin/env bash
# Multi-GPU checks on a 4-GPU host: the multi-GPU tests, layout equality (dense, MoE, CP) against one GPU,
# and pipeline vs FSDP on the 1.7B shape. Logs land in $OUT/multi/, packed into $OUT/multi.tgz.
#   bash benchmarks/gpu_multi.sh
set -u
export PYTHONPATH=$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/archon_out}
D=$OUT/multi
R=/tmp/leq
mkdir -p "$D" "$R"
TR="torchrun --standalone --nproc-per-node 4"
# 1. references on GPUs 0/1 while the 2-GPU tests run on GPUs 2,3
( CUDA_VISIBLE_DEVICES=0 timeout 190 bash -c "python3 benchmarks/layout_equality.py --suite dense --ref $R &&
  python3 benchmarks/layout_equality.py --suite cp --ref $R" > "$D/ref_dense_cp.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 190 python3 benchmarks/layout_equality.py --suite moe --ref $R > "$D/ref_moe.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout 200 python3 -m pytest -m gpu -q --timeout 190 -p no:cacheprovider \
    tests packages/archon-parallel packages/archon-rl packages/archon/tests/test_rl_actor.py \
    packages/archon/tests/test_rl_sampler.py > "$D/pytest_multi.log" 2>&1; echo "exit $?" >> "$D/pytest_multi.log" ) &
wait
# 2. every layout on 4 GPUs against its reference
for s in dense moe cp; do
  timeout 95 $TR benchmarks/layout_equality.py --suite $s --ref $R > "$D/eq_$s.log" 2>&1; echo "exit $?" >> "$D/eq_$s.log"
  cp $R/eq_$s.json "$D/" 2>/dev/null
done
# 3. pipeline (1F1B, Interleaved1F1B) vs dp4 on the 1.7B shape
timeout 110 $TR benchmarks/pp_compare.py --warmup 1 --steps 3 --docs 48 > "$D/pp_compare.log" 2>&1; echo "exit $?" >> "$D/pp_compare.log"
for f in "$D"/*.log; do echo "=== $f"; grep -v "DEBUG\|^\s*$" "$f" | tail -n 25; done
tar czf "$OUT/multi.tgz" -C "$OUT" multi && rm -rf "$D"
