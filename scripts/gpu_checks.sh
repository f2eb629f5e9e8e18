#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of at most BUDGET_S seconds (default 470, under
# the 8 minutes a lent GPU machine gives one command), each step with its own time limit so that
# one slow step cannot take the others' results with it:
#
#   1. the CUDA tests (test/test_cuda.py): CPU = CUDA = fp16 on 24 unseen scenes (AP, network
#      outputs, operating-point detections), graph replay, detect_batch graphs per batch size;
#   2. the bench in fp32: speed-ups on/off (dense pyramid, graphs, cuDNN, layout, ...), the
#      pipeline per stage (letterbox / NMS on the device: the share outside the network) and
#      batches 1/4/8 in fp32 AND fp16 for ours and ssd300_vgg16 (ms per frame, frames/s);
#   3. the same speed-ups and pipeline in fp16;
#   4. the pyramid as branches / one dense conv up to dilation 3 / one dense conv everywhere,
#      fp32 and fp16, interleaved A/B of our detector;
#   5. torch.compile's options (eager, compile, no freezing) in fp16, replayed as CUDA graphs;
#   6. the fp32 and fp16 runs side by side (compare.md).
#
# Results in $OUT (default gpu_out/), at most 8 files, each well under 16 MB: log.txt (every
# step's output), bench_fp32.{json,md}, bench_fp16.{json,md}, ab_dense.json,
# bench_compile.json, compare.md. Only the repository travels: no rosbags (the pipeline
# section then skips message building) and no Cyclone DDS are needed.
#
#   OUT=gpu_out BUDGET_S=470 bash scripts/gpu_checks.sh [FRAME.png]
#   DEVICE=cpu OUT=/tmp/gpu_cpu bash scripts/gpu_checks.sh   # tiny settings: checks the script
#
# DEVICE=cpu runs every step on the CPU with --quick sizes and few repeats (minutes on 2 cores):
# the numbers mean nothing, the files and the flow are the same.
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-470}
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
FRAME=${1:-}
PY=${PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$DEVICE" = cpu ]; then
    BENCH=(--device cpu --quick --threads 1 --repeats 2 --warmup 1)
    HALF=()  # fp16 is CUDA's; the batches section still measures fp16 on the CPU
    AB=(--device cpu --input-size 64 192 --threads 1 --repeats 3 --warmup 1)
    COMPILE_VARIANTS=eager  # inductor needs minutes per network on a small CPU
else
    BENCH=(--device "$DEVICE" --repeats 50 --warmup 10 ${FRAME:+--frame "$FRAME"})
    HALF=(--half)
    AB=(--device "$DEVICE" --repeats 50 --warmup 10)
    COMPILE_VARIANTS=eager,compile,compile_no_freezing
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
step() {  # step SECONDS NAME COMMAND...: run with a limit (cut to the budget left), log all
    local limit=$1 name=$2 remaining begin
    shift 2
    remaining=$(($(left) - 5))
    if [ "$remaining" -lt 15 ]; then
        echo "=== $name: skipped, ${remaining}s of the budget left" | tee -a "$LOG"
        return 0
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    begin=$(date +%s)
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $(($(date +%s) - begin))s" | tee -a "$LOG"
}
keep() {  # keep SRC DST: copy a result into $OUT when the step produced it
    [ -f "$1" ] && cp "$1" "$OUT/$2"
}

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee -a "$LOG"

# the CPU legs of the tests (the CPU pipeline they compare against) use the in-place PReLU
step 60 "build the CPU kernel" $PY -m dds_perception.detection.native_prelu
# measured on an H200 (2026-11-27, earlier tests): 92 s; now three AP runs + batch tests
step 150 "CUDA tests" $PY -m pytest -q -s -p no:cacheprovider test/test_cuda.py
step 110 "bench fp32" $PY -m dds_perception.cli bench "${BENCH[@]}" --no-compile \
    --sections speedups,pipeline,batches --out "$TMP/fp32"
keep "$TMP/fp32/bench.json" bench_fp32.json
keep "$TMP/fp32/bench.md" bench_fp32.md
if [ ${#HALF[@]} -gt 0 ]; then
    step 80 "bench fp16" $PY -m dds_perception.cli bench "${BENCH[@]}" "${HALF[@]}" --no-compile \
        --sections speedups,pipeline --out "$TMP/fp16"
    keep "$TMP/fp16/bench.json" bench_fp16.json
    keep "$TMP/fp16/bench.md" bench_fp16.md
fi
DENSE=(--variant branches:dense_pyramid=false
    --variant dense_up_to_3:dense_pyramid=true,dense_pyramid_max_dilation=3
    --variant dense_all:dense_pyramid=true)
step 40 "pyramid as one conv, fp32" $PY -m dds_perception.benchmarks.ab "${DENSE[@]}" "${AB[@]}" \
    --json "$TMP/ab_fp32.json"
if [ ${#HALF[@]} -gt 0 ]; then
    step 40 "pyramid as one conv, fp16" $PY -m dds_perception.benchmarks.ab "${DENSE[@]}" \
        "${AB[@]}" --half --json "$TMP/ab_fp16.json"
fi
$PY - "$TMP" "$OUT/ab_dense.json" <<'EOF' 2>>"$LOG"
import json, pathlib, sys
tmp, out = pathlib.Path(sys.argv[1]), sys.argv[2]
runs = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("ab_*.json"))}
if runs:
    pathlib.Path(out).write_text(json.dumps(runs, indent=1))
EOF
step 200 "torch.compile options" $PY -m dds_perception.cli bench "${BENCH[@]}" "${HALF[@]}" \
    --sections compile --compile-variants "$COMPILE_VARIANTS" --out "$TMP/compile"
keep "$TMP/compile/bench.json" bench_compile.json
runs=()
for run in fp32 fp16; do [ -f "$TMP/$run/bench.json" ] && runs+=("$TMP/$run"); done
if [ ${#runs[@]} -gt 0 ]; then
    step 30 "compare" $PY -m dds_perception.cli bench --compare "${runs[@]}" --out "$TMP/cmp"
    keep "$TMP/cmp/compare.md" compare.md
fi
rm -rf "$TMP"
echo "=== done after $(($(date +%s) - START))s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
grep -E "passed|failed|error|Error|speed ratio|median|=== " "$LOG" | tail -n 60
