#!/usr/bin/env bash
export PYTHONPATH=$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1
O=$OUT/r2; mkdir -p $O/prof
( CUDA_VISIBLE_DEVICES=0 timeout 400 python3 benchmarks/train_throughput.py --models qwen3-1.7b --shapes seq4096 \
    --compile on --scopes block stack --profile $O/prof --json $O/tt17.json > $O/tt17.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 400 bash -c "python3 -m pytest -q -m gpu packages/archon/tests/test_engine.py packages/archon/tests/test_compile_scope.py packages/archon-attn packages/archon/tests/test_static_shapes.py -p no:cacheprovider -x;
  python3 benchmarks/train_throughput.py --models qwen3-0.6b --shapes seq4096 --compile on --scopes block stack --json $O/tt06.json" > $O/tt06.log 2>&1 ) &
wait
timeout 170 torchrun --standalone --nproc-per-node 2 benchmarks/tree_training.py --batches grpo --prompts 4 --samples 8 \
  --modes disabled,dta --dp-layouts fsdp,zero1 --json $O/tree_dp2.json > $O/tree_dp2.log 2>&1
for f in $O/*.log; do echo "== $f"; grep -v "Warning\|warn(\|^\s*$" $f | tail -n 22; done
for f in $O/prof/*; do head -c 2500 $f; echo; done
tar czf $OUT/r2.tgz -C $OUT r2 && rm -rf $O
