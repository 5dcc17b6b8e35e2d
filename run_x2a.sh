#!/usr/bin/env bash
export PYTHONPATH=$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1
O=$OUT/r1; mkdir -p $O/prof
nvidia-smi -L
( CUDA_VISIBLE_DEVICES=0 timeout 480 python3 benchmarks/train_throughput.py --models qwen3-1.7b --shapes seq4096 \
    --compile on --scopes block stack --profile $O/prof --json $O/tt17.json > $O/tt17.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 480 bash -c "python3 -m pytest -q -m gpu packages/archon/tests/test_compile_scope.py -p no:cacheprovider;
  python3 benchmarks/train_throughput.py --models qwen3-0.6b --shapes seq4096 --compile on --scopes block stack --json $O/tt06.json" > $O/tt06.log 2>&1 ) &
wait
for f in $O/*.log; do echo "== $f"; grep -v "Warning\|warn(" $f | tail -n 30; done
tar czf $OUT/r1.tgz -C $OUT r1 && rm -rf $O
