#!/usr/bin/env bash
# The whole GPU benchmark of issue 6 in ONE call (GPU time is scarce): synthetic set -> split ->
# reference recipe training (eager, a captured CUDA graph, torch.compile) -> inference (PyTorch, ONNX Runtime)
# -> JSON + markdown table in $OUT. Every step's JSON is copied to $OUT as soon as it exists, so a
# run stopped at its time limit still returns what it measured.
#
# On the H200 (bare machine: torch, timm, onnx, onnxruntime, sklearn, matplotlib; no internet):
#   bash benchmarks/gpu_bench.sh                      # at most ~9 min (LIMIT_S); needs rich/typer: see DEPS below
# CPU rehearsal of the same script (what was run in the session that wrote it):
#   DEVICE=cpu PER_CLASS=24 IMAGE_SIZE=32 BACKBONE=resnet18 EPOCHS=2 BATCH=16 bash benchmarks/gpu_bench.sh
#
# Environment (defaults = the issue's reference recipe on the full-size set):
#   DEVICE=cuda  BACKBONE=resnet101  IMAGE_SIZE=224  BATCH=64  EPOCHS=5  PER_CLASS=  (real counts)
#   COMPILE_MODES="reduce-overhead reduce-overhead default"   torch.compile runs after the eager one (CUDA graphs
#                first; a mode named twice is run again with the compile cache its first run filled: "-warm")
#   BUDGET_S=400   optional steps (compile modes) are skipped once this many seconds have passed
#   LIMIT_S=530    every step is interrupted (Ctrl-C: the epochs it finished are kept) so that the report
#                  step still runs before this many seconds; keep it under the device call's timeout_s
#   WORK=/tmp/gpu_bench   data, runs and caches;  OUT=<folder for results> (the device tool sets it)
#   PY=python3;  DEPS=build/gpu-deps (pure-Python rich/typer/click/pygments/... copied there by
#   `bash benchmarks/gpu_deps.sh`; carry it with the run: carry=["build/gpu-deps"])
set -uo pipefail

DEVICE=${DEVICE:-cuda}; BACKBONE=${BACKBONE:-resnet101}; IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH=${BATCH:-64}; EPOCHS=${EPOCHS:-5}; PER_CLASS=${PER_CLASS:-}
COMPILE_MODES=${COMPILE_MODES-reduce-overhead reduce-overhead default}; BUDGET_S=${BUDGET_S:-400}; LIMIT_S=${LIMIT_S:-530}
WORK=${WORK:-/tmp/gpu_bench}; OUT=${OUT:-build/gpu_bench_out}; PY=${PY:-python3}; DEPS=${DEPS:-build/gpu-deps}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
RESULTS="$WORK/results"
LOG="$OUT/gpu_bench.log"
START=$(date +%s)
# a fresh compile cache: the first compiled run pays the whole compile time, as a user's first run would
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache"; rm -rf "$TORCHINDUCTOR_CACHE_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO/src${DEPS:+:$REPO/$DEPS}${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[gpu_bench +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }
keep() { cp -f "$RESULTS"/*.json "$OUT"/ 2>/dev/null || true; }  # results back even if stopped later

log "device=$DEVICE backbone=$BACKBONE size=$IMAGE_SIZE batch=$BATCH epochs=$EPOCHS per_class=${PER_CLASS:-real}"
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import importlib.util, sys
missing = [m for m in ("torch", "timm", "numpy", "PIL", "yaml", "rich", "sklearn", "matplotlib", "onnx",
                       "onnxruntime") if importlib.util.find_spec(m) is None]
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if missing:
    sys.exit(f"missing modules: {missing}; run `bash benchmarks/gpu_deps.sh` here and carry build/gpu-deps")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 3
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
  log "DEVICE=$DEVICE but no CUDA GPU here"; exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"

# 1. data: the full-size synthetic set (13,664 crops by default) and the 70/25/5 split
# (a rerun on the same warm machine with the same PER_CLASS reuses them; results start afresh)
rm -rf "$RESULTS" "$WORK/runs"
t0=$(date +%s)
if [ -f "$WORK/split/split.csv" ] && [ "$(cat "$WORK/data.key" 2>/dev/null)" = "${PER_CLASS:-real}" ]; then
  log "reusing $WORK/split"
else
  "$PY" -m crystalscope.cli synth "$WORK/full" ${PER_CLASS:+--per-class $PER_CLASS} --force -q 2>&1 | tee -a "$LOG" &&
  "$PY" -m crystalscope.cli split "$WORK/full" "$WORK/split" --force -q 2>&1 | tail -n 4 | tee -a "$LOG" &&
  echo "${PER_CLASS:-real}" > "$WORK/data.key" || { log "data step failed"; exit 4; }
fi
log "data ready in $(( $(date +%s) - t0 )) s"

# 2. training, reference recipe, 5 epochs (the F1 stop disabled: threshold above 1)
common=(--set backbone=$BACKBONE --set weights=none --set image_size=$IMAGE_SIZE --set batch_size=$BATCH
        --set epochs=$EPOCHS --set f1_threshold=1.01 --set device=$DEVICE --results "$RESULTS"
        --f1-targets 0.9,0.95,0.99,0.997 --group gpu-train --runs "$WORK/runs")
bounded() {  # command...: run it, interrupted (SIGINT) when LIMIT_S is near
  local left=$(( LIMIT_S - 20 - $(elapsed) ))
  if [ "$left" -lt 20 ]; then log "no time left for: $*"; return 124; fi
  timeout --signal=INT --kill-after=10 "$left" "$@"
}
train_run() {  # name, extra args...
  local name=$1; shift
  local t=$(date +%s%N)
  bounded "$PY" benchmarks/bench_train.py "$WORK/split" --name "$name" "${common[@]}" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "$name: process wall $(( ($(date +%s%N) - t) / 1000000 )) ms (rc $rc)"
  keep
}
# cold: empty decode cache, as a user's first run
train_run "train-$BACKBONE-eager" --set cache_dir="$WORK/cache-cold"
# the eager step recorded once as a CUDA graph (--cuda-graphs: no compile time); CUDA only
[ "$DEVICE" = cpu ] || train_run "train-$BACKBONE-cuda-graphs" --set cuda_graphs=true --set cache_dir="$WORK/cache-cold"
# 3. inference: PyTorch vs ONNX Runtime (untrained weights: the speed does not depend on them)
if [ "$DEVICE" = cpu ]; then bs=1,8,32; nm=32; th=(--threads 1); else bs=1,64,256; nm=${N_MODEL:-256}; th=(); fi
bounded "$PY" benchmarks/bench_infer.py --backbone "$BACKBONE" --image-size "$IMAGE_SIZE" --images "$WORK/split/test" \
  --batch-sizes $bs --n-model $nm "${th[@]}" --device "$DEVICE" --name "infer-$BACKBONE" --group gpu-infer --results "$RESULTS" 2>&1 | tee -a "$LOG"
keep
# 4. torch.compile, warm decode cache (the eager run filled it)
seen=" "
for mode in $COMPILE_MODES; do
  name="train-$BACKBONE-compile-$mode"; case "$seen" in *" $mode "*) name="$name-warm";; esac; seen="$seen$mode "
  if [ "$(elapsed)" -gt "$BUDGET_S" ]; then log "skipping $name: $(elapsed) s > BUDGET_S=$BUDGET_S"; continue; fi
  train_run "$name" --set compile=true --set compile_mode=$mode --set cache_dir="$WORK/cache-cold"
done

# 5. the table (JSON already in $OUT)
"$PY" benchmarks/report.py "$RESULTS" --gpu-table "$OUT/gpu_table.md" 2>&1 | tee -a "$LOG"
"$PY" -c "import json,glob; json.dump({p.split('/')[-1][:-5]: json.load(open(p)) for p in sorted(glob.glob('$RESULTS/*.json'))}, open('$OUT/gpu_results.json','w'), indent=1)"
rm -f "$OUT"/train-*.json "$OUT"/infer-*.json  # merged into gpu_results.json (at most 8 files come back)
log "done in $(elapsed) s; results in $OUT"
