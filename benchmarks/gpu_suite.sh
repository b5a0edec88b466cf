#!/usr/bin/env bash
# The one prepared run for a lent GPU machine: every GPU benchmark, each under its own
# timeout, results and a tar of the logs in $OUT (at most 8 files come back).
#
# Here, first:   ../shared/gpu/pack.sh                  (writes .gpu/, ignored by git)
# Device call:   bash .gpu/unpack.sh && bash benchmarks/gpu_suite.sh     with carry: [".gpu"]
#
# Sized for the 15 minutes of device time a task gets, start-up included: the steps run in
# order of what they prove, so a run cut short still returns the first ones.
set -u
OUT=${OUT:-/tmp/sgmft-gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$LOGS/steps.txt"
  cp benchmarks/results/"$name".json "$OUT/" 2>/dev/null || true
}

nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
step gpu_train 300 python -m benchmarks.gpu_train --quick      # resume after a crash, data wait, vs the bare step
step gpu_serve 200 python -m benchmarks.serve_load --gpu       # HTTP posts/s and latency vs the in-process forward
step gpu_check 90 python -m benchmarks.gpu_check --quick --compile
step gpu_tune 150 python -m benchmarks.tune_cache --gpu        # 8 cached trials at 0.25 GPU vs 8 end to end
tar czf "$OUT/logs.tgz" -C "$LOGS" .
cat "$LOGS/steps.txt"
