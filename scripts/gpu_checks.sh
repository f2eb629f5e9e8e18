#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA tests (graph replay, on-device
# normalisation, CPU/CUDA/fp16 AP on generated scenes), the bench in fp16 and fp32, the demo in
# fp16, and torch.compile on the GPU. Each step has its own time limit so that one slow step
# cannot take the others' results with it. Results go to $OUT (default gpu_out/).
#
#   OUT=gpu_out BUDGET_S=470 bash scripts/gpu_checks.sh [FRAME.png]
#
# BUDGET_S: seconds the whole script may take; the last step (torch.compile, the slowest to
# start) gets what the others left.
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-600}
OUT=${OUT:-gpu_out}
FRAME=${1:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT/fp16" "$OUT/fp32" "$OUT/compile"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/log.txt
step() {  # step SECONDS NAME COMMAND...: run with a limit, log everything, never stop the script
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? at $(date -u +%T)" | tee -a "$LOG"
}
bench() {  # bench SECONDS DIR ARGS...: bench into a scratch folder, keep the JSON and markdown
    local limit=$1 dir=$2
    shift 2
    step "$limit" "bench $dir" $PY -m dds_perception.cli bench --device cuda --out "/tmp/$dir" \
        ${FRAME:+--frame "$FRAME"} "$@"
    cp "/tmp/$dir/bench.json" "/tmp/$dir/bench.md" "$OUT/$dir/" 2>/dev/null
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv | tee -a "$LOG"
$PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, \
torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name())" | tee -a "$LOG"

step 100 "CUDA tests" $PY -m pytest -q -s -p no:cacheprovider test/test_cuda.py
bench 130 fp16 --half --repeats 100 --warmup 20 --no-compile \
    --sections detectors,speedups,pipeline,memory,backbones
bench 80 fp32 --repeats 100 --warmup 20 --no-compile --sections detectors,speedups,pipeline,memory
step 60 "demo fp16" $PY -m dds_perception.cli demo --device cuda --half --no-live --frames 40 \
    --out /tmp/demo_fp16
cp /tmp/demo_fp16/ap.md "$OUT/demo_fp16_ap.md" 2>/dev/null
LEFT=$((BUDGET_S - ($(date +%s) - START) - 10))
if [ "$LEFT" -gt 60 ]; then
    bench "$LEFT" compile --half --repeats 100 --warmup 20 --sections speedups
else
    echo "=== bench compile: skipped, ${LEFT}s left" | tee -a "$LOG"
fi
grep -E "passed|failed|error|speed ratio|AP_40|Car|=== " "$LOG" | tail -n 40
