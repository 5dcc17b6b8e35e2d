#!/usr/bin/env bash
# Multi-GPU checks on a 2- or 4-GPU host: the multi-GPU tests, layout equality (dense, MoE, CP) against one GPU,
# and pipeline vs FSDP on the 1.7B shape. Logs land in $OUT/multi/, packed into $OUT/multi.tgz.
#   bash benchmarks/gpu_multi.sh            # N = number of GPUs nvidia-smi lists (2 or 4)
#   NGPU=2 bash benchmarks/gpu_multi.sh     # or say N (e.g. 4 of an 8-GPU host)
# N=4: references on GPUs 0/1 while the 2-GPU tests run on GPUs 2,3; then the 4-rank layouts; pp2xdp2 vs dp4.
# N=2: references (GPU 0: dense, cp; GPU 1: moe); then the 2-GPU tests; then the 2-rank layouts; pp2 vs dp2.
# The timeouts bound the run: N=4 200 + 3 x 95 + 110 s (10 min), N=2 60 + 120 + 3 x 95 + 110 s (9.6 min).
set -u
export PYTHONPATH=$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/archon_out}
D=$OUT/multi
R=/tmp/leq
N=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$N" != 2 ] && [ "$N" != 4 ]; then
  echo "gpu_multi.sh: needs 2 or 4 GPUs, found $N; set NGPU=2 or NGPU=4 to use that many of them" >&2
  exit 1
fi
mkdir -p "$D" "$R"
TR="torchrun --standalone --nproc-per-node $N"
ref() {  # ref GPU TIMEOUT LOG SUITE...: the 1-GPU references of the suites, one after the other
  local gpu=$1 t=$2 log=$3; shift 3
  local cmd="" s
  for s in "$@"; do cmd="$cmd${cmd:+ && }python3 benchmarks/layout_equality.py --suite $s --ref $R"; done
  CUDA_VISIBLE_DEVICES=$gpu timeout "$t" bash -c "$cmd" > "$D/$log" 2>&1; echo "exit $?" >> "$D/$log"
}
pytest_multi() {  # pytest_multi GPUS TIMEOUT: the 2-GPU tests
  CUDA_VISIBLE_DEVICES=$1 timeout "$2" python3 -m pytest -m gpu -q --timeout $(($2 - 10)) -p no:cacheprovider \
    tests packages/archon-parallel packages/archon-rl packages/archon/tests/test_rl_actor.py \
    packages/archon/tests/test_rl_sampler.py > "$D/pytest_multi.log" 2>&1; echo "exit $?" >> "$D/pytest_multi.log"
}
# 1. references (world size 1) and the 2-GPU tests
if [ "$N" = 4 ]; then  # references on GPUs 0/1 while the 2-GPU tests run on GPUs 2,3
  ref 0 190 ref_dense_cp.log dense cp &
  ref 1 190 ref_moe.log moe &
  pytest_multi 2,3 200 &
  wait
else  # references first (one GPU each), then the 2-GPU tests on both
  ref 0 60 ref_dense_cp.log dense cp &
  ref 1 60 ref_moe.log moe &
  wait
  pytest_multi 0,1 120
fi
# 2. every layout of N ranks against its reference
for s in dense moe cp; do
  timeout 95 $TR benchmarks/layout_equality.py --suite $s --ref $R > "$D/eq_$s.log" 2>&1
  echo "exit $?" >> "$D/eq_$s.log"
  cp "$R/eq_${s}_w$N.json" "$D/" 2>/dev/null
done
# 3. pipeline (1F1B, Interleaved1F1B) vs FSDP on the 1.7B shape (pp2xdp2 vs dp4, or pp2 vs dp2); 12 documents
#    per data-parallel rank of the dp layout, so every rank (and every pipeline) gets the same work at N=2 and 4
timeout 110 $TR benchmarks/pp_compare.py --warmup 1 --steps 3 --docs $((12 * N)) > "$D/pp_compare.log" 2>&1
echo "exit $?" >> "$D/pp_compare.log"
for f in "$D"/*.log; do echo "=== $f"; grep -v "DEBUG\|^\s*$" "$f" | tail -n 25; done
tar czf "$OUT/multi.tgz" -C "$OUT" multi && rm -rf "$D"
