#!/bin/bash
# The seeded CPU-path command (docs/benchmarks.md, "CPU speed" -> "On the current generator") on two
# checkouts of crystalscope, interleaved before/after, each run with an empty decode cache: how the
# issue 11 restructuring was checked ("Restructuring check (issue 11)").
#
#   git worktree add --detach /tmp/before 545dc0c
#   BEFORE=/tmp/before AFTER=$PWD SPLIT=/tmp/speed2/split RUNS=3 bash benchmarks/before_after.sh
set -u
BEFORE=${BEFORE:?checkout of the code before}; AFTER=${AFTER:-$PWD}; SPLIT=${SPLIT:?split folder}
RUNS=${RUNS:-3}; RES=${RES:-/tmp/crystalscope-before-after}; PY=${PY:-$AFTER/.venv/bin/python}
mkdir -p "$RES"
for r in $(seq 1 "$RUNS"); do
  for side in before after; do
    dir=$BEFORE; [ $side = after ] && dir=$AFTER
    rm -rf "$RES/cache-$side-r$r"
    ( cd "$dir" && PYTHONPATH=src "$PY" benchmarks/bench_train.py "$SPLIT" --name i11-$side-r$r --group i11 --threads 2 \
      --set backbone=efficientnet_lite0 --set weights=imagenet --set image_size=160 --set trainable_fraction=0.33 \
      --set cache_frozen=true --set feature_passes=1 --set lr=0.01 --set epochs=2 --set f1_threshold=0.995 \
      --set cache_dir="$RES/cache-$side-r$r" --results "$RES" ) > "$RES/i11-$side-r$r.log" 2>&1
    echo "$side r$r: $(grep 'whole run' "$RES/i11-$side-r$r.log" | tail -1) load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
