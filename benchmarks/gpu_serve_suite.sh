#!/usr/bin/env bash
# A shorter prepared GPU run for the serving path alone (after benchmarks/gpu_suite.sh has
# measured training): the CUDA-graph runner's GPU test, the serving benchmark, the bare
# step. Same conventions as gpu_suite.sh: one timeout per step, results and logs in $OUT.
set -u
OUT=${OUT:-/tmp/sgmft-gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
run_step() {  # run_step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo "$name rc=$? seconds=$((SECONDS - start))" | tee -a "$LOGS/steps.txt"
  cp benchmarks/results/"$name".json "$OUT/" 2>/dev/null || true
}
run_step graph_test 45 python -m pytest -q -p no:cacheprovider tests/test_predict.py -k "graph or runner"
run_step gpu_serve 150 python -m benchmarks.serve_load --gpu --quick
run_step gpu_check 40 python -m benchmarks.gpu_check --quick
tar czf "$OUT/logs.tgz" -C "$LOGS" .
