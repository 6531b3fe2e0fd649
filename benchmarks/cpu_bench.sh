#!/usr/bin/env bash
# The CPU tables of docs/benchmarks.md: training throughput (small synthetic split: the rate does not
# depend on the set's size), inference PyTorch vs ONNX Runtime. The CPU-path trials on the full-size
# set are separate, long commands, listed in docs/benchmarks.md.
#   bash benchmarks/cpu_bench.sh            # ~10 min on 2 free cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; WORK=${WORK:-/tmp/bench}; RESULTS=${RESULTS:-benchmarks/results}
THREADS=${THREADS:-1}  # torch threads; 1 avoids the OpenMP spin-wait slowdown of a busy 2-core machine (5x measured)
if [ ! -f "$WORK/smallsplit/split.csv" ]; then
  .venv/bin/crystalscope synth "$WORK/small" --per-class 300 -q --force
  .venv/bin/crystalscope split "$WORK/small" "$WORK/smallsplit" -q --force
fi
for spec in "resnet18 none 64" "resnet18 none 160" "efficientnet_lite0 imagenet 64" "efficientnet_lite0 imagenet 160"; do
  set -- $spec
  $PY benchmarks/bench_train.py "$WORK/smallsplit" --name "cpu-train-$1-$3" --group cpu-throughput \
    --set backbone=$1 --set weights=$2 --set image_size=$3 --set epochs=2 --set f1_threshold=1.01 \
    --set onnx=false --set cache_dir="$WORK/cache" --threads "$THREADS" --results "$RESULTS"
done
$PY benchmarks/bench_infer.py --backbone efficientnet_lite0 --image-size 160 --images "$WORK/smallsplit/test" \
  --batch-sizes 1,32,128 --threads "$THREADS" --name infer-cpu-efficientnet_lite0-160 --results "$RESULTS"
$PY benchmarks/bench_infer.py --backbone resnet18 --image-size 64 --images "$WORK/smallsplit/test" \
  --batch-sizes 1,32,128 --threads "$THREADS" --name infer-cpu-resnet18-64 --results "$RESULTS"
$PY benchmarks/report.py "$RESULTS" --doc docs/benchmarks.md
