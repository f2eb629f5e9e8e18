#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA tests (graph replay, on-device
# normalisation, CPU/CUDA/fp16 AP on generated scenes), the bench in fp16 (with torch.compile)
# and fp32, the demo in fp16, and the backbones. Each step has its own time limit so that one
# slow step cannot take the others' results with it. Results go to $OUT (default gpu_out/); on
# the lent device machine: the pip line of its README for the carried wheels (rosbags and its
# needs), then `BUDGET_S=465 bash scripts/gpu_checks.sh .data/gpu/000000.png`.
#
#   OUT=gpu_out BUDGET_S=470 bash scripts/gpu_checks.sh [FRAME.png]
#
# BUDGET_S: seconds the whole script may take; the last step (the backbones) gets what the
# others left.
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-600}
OUT=${OUT:-gpu_out}
FRAME=${1:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT/fp16" "$OUT/fp32" "$OUT/backbones"
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

# measured on an H200 (2026-11-27): CUDA tests 92 s, fp16 with torch.compile about 170 s,
# fp32 40 s, demo 18 s; the backbones (six classifiers at batch 1 and 32) take what is left
step 120 "CUDA tests" $PY -m pytest -q -s -p no:cacheprovider test/test_cuda.py
bench 240 fp16 --half --repeats 100 --warmup 20 --sections detectors,speedups,pipeline,memory
bench 80 fp32 --repeats 100 --warmup 20 --no-compile --sections detectors,speedups,pipeline,memory
step 60 "demo fp16" $PY -m dds_perception.cli demo --device cuda --half --no-live --frames 40 \
    --out /tmp/demo_fp16
cp /tmp/demo_fp16/ap.md "$OUT/demo_fp16_ap.md" 2>/dev/null
LEFT=$((BUDGET_S - ($(date +%s) - START) - 10))
if [ "$LEFT" -gt 60 ]; then
    bench "$LEFT" backbones --half --repeats 50 --warmup 10 --sections backbones
else
    echo "=== bench backbones: skipped, ${LEFT}s left" | tee -a "$LOG"
fi
grep -E "passed|failed|error|speed ratio|AP_40|Car|=== " "$LOG" | tail -n 40
