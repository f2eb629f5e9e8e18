#!/usr/bin/env bash
# Caltech classification on a lent GPU machine: training throughput of each backbone and of the
# four side by side, then as much of the paper's protocol (300 epochs at batch 512, learning
# rate halved at epochs 50, 100, 130, ..., 280: config/train/paper_$DATASET.yaml) as fits in the
# budget, the four models side by side on one device pipeline, with resumable checkpoints.
#
# What travels limits the steps. To the device machine, one call carries at most 64 MiB, the
# repository's ~17 MB included, so Caltech-101 (56 MB of JPEGs) and a four-model checkpoint
# (~60 MB) travel as bundles of at most 3 x 14 MiB over consecutive calls, while the machine is
# still warm (it goes back after 30 s idle). Back from it come at most 8 files of 16 MB, 64 MiB
# together: the run folder as 15 MiB pieces of one .tgz, its checkpoints compressed losslessly.
#
#   here:    bash scripts/gpu_caltech.sh pack [DATA_ROOT [RUN_DIR]]
#              -> .data/gpu/b1 .data/gpu/b2 ... (RUN_DIR: an unpacked earlier run to resume)
#   device:  one call per bundle, back to back, the last one runs:
#              carry [".data/gpu/b1"]  command: bash scripts/gpu_caltech.sh stage
#              ...
#              carry [".data/gpu/bN"]  command: BUDGET_MIN=9 bash scripts/gpu_caltech.sh run
#            (timeout_s 600; BUDGET_MIN is what the script may take, packing included)
#   here:    bash scripts/gpu_caltech.sh unpack FILES_AT RUN_DIR
#              -> RUN_DIR/<model>/ (metrics, checkpoint parts), comparison.md, throughput.json
#
# Settings (environment): DATASET (caltech101), BUDGET_MIN (9), OUT (gpu_out; $OUT on the
# device machine), WORK (/tmp/dds), TP_STEPS (20), TABLE_STEPS (the comparison table's step
# columns; Caltech-101: 1000 2000 3000 3750), TRAIN_ARGS (more compare-backbones options,
# e.g. "--compile --amp-dtype float16"), TINY=1 (a CPU check of the whole path in a few
# minutes: width 0.25, 32-px crops, batch 16, 2 epochs of 2 steps).
set -u
CMD=${1:-}
shift || true
DATASET=${DATASET:-caltech101}
BUDGET_MIN=${BUDGET_MIN:-9}
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/dds}
TP_STEPS=${TP_STEPS:-20}
TRAIN_ARGS=${TRAIN_ARGS:-}
PY=${PYTHON:-python3}
BUNDLES=.data/gpu
CHUNK=14M    # 3 chunks a bundle: 42 MiB + the repository stays under 64 MiB
PER_BUNDLE=3
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

die() {
    echo "gpu_caltech.sh: $*" >&2
    exit 2
}

pack() {  # pack [DATA_ROOT [RUN_DIR]]: the data (and a run to resume) as carry bundles
    local data=${1:-../shared/data/${DATASET}_s128} run=${2:-}
    [ -d "$data" ] || data=${1:-../shared/data/${DATASET}_subset}
    [ -d "$data" ] || die "no data folder $data"
    [ -z "$run" ] || [ -d "$run" ] || die "no run folder $run"
    rm -rf "$BUNDLES"
    mkdir -p "$BUNDLES/chunks"
    local names="data=$(basename "$data")${run:+ run=$(basename "$run")}"
    local sources=(-C "$(dirname "$data")" "$(basename "$data")")
    [ -z "$run" ] || sources+=(-C "$(dirname "$run")" "$(basename "$run")")
    tar -czf - "${sources[@]}" | split -b "$CHUNK" -d -a 3 - "$BUNDLES/chunks/chunk." ||
        die "cannot pack $data $run"
    local i=0 b=1 listed=()
    for chunk in "$BUNDLES"/chunks/chunk.*; do  # chunk.000, chunk.001, ...: in stream order
        [ "$i" -lt "$PER_BUNDLE" ] || { b=$((b + 1)); i=0; }
        mkdir -p "$BUNDLES/b$b"
        mv "$chunk" "$BUNDLES/b$b/"
        listed+=("b$b/$(basename "$chunk")")
        i=$((i + 1))
    done
    rmdir "$BUNDLES/chunks"
    (cd "$BUNDLES" && sha256sum "${listed[@]}" >"b$b/MANIFEST" && echo "$names" >"b$b/PACKED")
    du -sh "$BUNDLES"/b* | sed 's/^/  /'
    echo "pack: $b bundle(s) in $BUNDLES ($names); device calls, back to back:"
    for k in $(seq 1 "$b"); do
        if [ "$k" -lt "$b" ]; then
            echo "  carry [\"$BUNDLES/b$k\"]  command: bash scripts/gpu_caltech.sh stage"
        else
            echo "  carry [\"$BUNDLES/b$k\"]  command: BUDGET_MIN=9 bash scripts/gpu_caltech.sh run"
        fi
    done
}

stage() {  # a bundle stays on the warm machine until the run call
    du -sh "$BUNDLES"/b* 2>/dev/null || die "no bundle arrived in $BUNDLES"
}

step() {  # step SECONDS NAME COMMAND...: run with a limit, log all, never stop the script
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    echo "=== $name: exit $status at $(date -u +%T)" | tee -a "$LOG"
    return $status
}

run() {  # on the device machine, after the bundles arrived
    local start
    start=$(date +%s)
    mkdir -p "$OUT"
    LOG=$OUT/log.txt
    local manifest
    manifest=$(ls "$BUNDLES"/b*/MANIFEST 2>/dev/null | tail -n 1)
    [ -n "$manifest" ] || die "no MANIFEST in $BUNDLES/b*: was the last bundle carried?"
    if ! (cd "$BUNDLES" && sha256sum --quiet -c "${manifest#"$BUNDLES"/}") >>"$LOG" 2>&1; then
        cat "$LOG" >&2
        die "a bundle is missing or damaged (did the machine go cold between the calls?)"
    fi
    local names data run_name
    names=$(cat "$(dirname "$manifest")/PACKED")
    data=$(echo "$names" | sed -n 's/.*data=\([^ ]*\).*/\1/p')
    run_name=$(echo "$names" | sed -n 's/.*run=\([^ ]*\).*/\1/p')
    rm -rf "$WORK/in" "$WORK/run"
    mkdir -p "$WORK/in"
    awk '{print $2}' "$manifest" | sed "s|^|$BUNDLES/|" | xargs cat | tar -xz -C "$WORK/in" ||
        die "cannot unpack the bundles"
    if [ -n "$run_name" ]; then
        mv "$WORK/in/$run_name" "$WORK/run"
        echo "resuming $run_name" | tee -a "$LOG"
    fi
    local config=config/train/paper_$DATASET.yaml
    # the table's columns: Caltech-101's as in docs/classification.md; else every evaluation
    local TABLE=${TABLE_STEPS:-}
    [ -n "$TABLE" ] || [ "$DATASET" != caltech101 ] || TABLE="1000 2000 3000 3750"
    TABLE=${TABLE:+--table-steps $TABLE}
    local common=(--config "$config" --dataset "$DATASET" --data-root "$WORK/in/$data"
        --cache-dir "$WORK/cache" --workers "$(nproc)" --no-progress)
    local tp_args=(--steps "$TP_STEPS" --warmup 5)
    if [ "${TINY:-0}" = 1 ]; then
        common+=(--device cpu --width-mult 0.25 --input-size 32 --batch-size 16 --test-size 0.2
            --eval-batch-size 64 --epochs 2 --max-steps-per-epoch 2 --eval-every-steps 2
            --workers 2)
        tp_args=(--steps 2 --warmup 1)
    fi
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
        $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    } | tee -a "$LOG"

    # 1. throughput: each backbone alone, the four side by side, the device augmentation, and
    #    the CPU loader path (JPEG decoding in DataLoader workers) for comparison
    step $((BUDGET_MIN * 60 / 4)) throughput $PY -m dds_perception.engine.throughput \
        "${common[@]}" "${tp_args[@]}" --json "$OUT/throughput.json"

    # 2. the paper's protocol, four models side by side, until the budget's end (minus packing)
    local left=$((BUDGET_MIN * 60 - ($(date +%s) - start) - 45))  # seconds
    if [ "$left" -ge 30 ]; then
        local minutes
        minutes=$(awk "BEGIN { printf \"%.2f\", $left / 60 }")
        # shellcheck disable=SC2086
        step $((left + 30)) "train ($minutes min)" $PY -m dds_perception.cli \
            compare-backbones --side-by-side "${common[@]}" --out "$WORK/run" \
            --max-minutes "$minutes" $TABLE $TRAIN_ARGS
    else
        echo "=== train: skipped, ${left} s left" | tee -a "$LOG"
    fi

    # 3. the run folder back: checkpoints at the epoch all models share, compressed; one .tgz
    #    in 15 MiB pieces (at most 5 of them: 8 files, 64 MiB come back)
    if [ -d "$WORK/run" ]; then
        local manifests=() folder
        for folder in "$WORK"/run/*/; do
            if [ -f "$folder/model.safetensors" ]; then  # finished: its weights, no checkpoint
                rm -f "$folder"/checkpoint.json "$folder"/checkpoint-*.part*
            elif [ -f "$folder/checkpoint.json" ]; then
                manifests+=("$folder/checkpoint.json")
            fi
        done
        if [ "${#manifests[@]}" -gt 0 ]; then
            step 60 compact $PY -m dds_perception.engine.checkpoint_parts compact "${manifests[@]}"
        fi
        cp "$WORK/run/comparison.md" "$OUT/" 2>/dev/null
        tar -czf - -C "$WORK" run | split -b 15M -d -a 2 - "$OUT/run.tgz."
        local pieces
        pieces=$(ls "$OUT"/run.tgz.* | wc -l)
        echo "run folder: $(du -ch "$OUT"/run.tgz.* | tail -n 1 | cut -f1) in $pieces piece(s)" |
            tee -a "$LOG"
        [ "$pieces" -le 5 ] || echo "WARNING: $pieces pieces: more than 8 files come back" |
            tee -a "$LOG"
    fi
    grep -E "img/s|top1|stopped|resumed|exit|WARNING|error" "$LOG" | tail -n 40
}

unpack() {  # unpack FILES_AT RUN_DIR: the run folder from what came back
    local from=${1:-} to=${2:-}
    [ -n "$from" ] && [ -n "$to" ] || die "usage: unpack FILES_AT RUN_DIR"
    ls "$from"/run.tgz.* >/dev/null 2>&1 || die "no run.tgz.* in $from"
    [ ! -e "$to" ] || die "$to exists: unpack into a new folder"
    mkdir -p "$to"
    cat "$from"/run.tgz.* | tar -xz -C "$to" --strip-components=1 || die "cannot unpack"
    cp "$from"/throughput.json "$from"/log.txt "$to"/ 2>/dev/null
    echo "unpacked into $to; resume with: bash scripts/gpu_caltech.sh pack DATA_ROOT $to"
}

case "$CMD" in
    pack) pack "$@" ;;
    stage) stage ;;
    run) run ;;
    unpack) unpack "$@" ;;
    *) die "usage: bash scripts/gpu_caltech.sh pack|stage|run|unpack (see the header)" ;;
esac
