#!/usr/bin/env bash
# The GPU check in one go: versions, install, GPU tests, the training-step table (ECG 12x10 and EEG 19x30,
# B = 64 and 256: (a) reference fp32 eager, (b) torch-native bf16 + compile, (c) ours with the Triton
# kernels), inference B = 1 19x30 with CUDA graphs, and the attention / masking kernel benchmarks vs PyTorch
# and SDPA.
#
#   OUT=DIR bash bench/gpu_check.sh              # on a CUDA machine; results in DIR
#   bash bench/gpu_check.sh --dry-run            # here, on CPU: same stages, tiny preset, tags that need a
#                                                # GPU stripped, tests only collected; a few minutes
#
# Every stage has its own time limit, cut to what is left of GPU_CHECK_BUDGET_S (default 480 s), and its
# own log, so a failing or slow stage costs only itself; the order is priority order. DIR gets at most 8
# files: summary.txt (stage table + summary tables, also printed last), the bench markdown tables, and
# gpu_check.tar.gz with every JSON / markdown / PNG and log. To commit: tar xzf gpu_check.tar.gz, copy
# results/*/*.json|md|png to bench/results/, run `python bench/report.py`.
#
# Needs torch, triton, scikit-build-core, pybind11, cmake, ninja, pytest, pytest-benchmark, numpy, scipy,
# matplotlib; not wfdb or pyedflib (the benchmark input is a shipped array; tests needing them skip).
# CBRAMOD_ORIGINAL=PATH adds the original implementation (a checkout of github.com/wjq-learning/CBraMod,
# its models/ folder is enough) as variant (a').
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-/tmp/gpu_check_dry_out}
    PY=${PYTHON:-$REPO/.venv/bin/python}
    export TRITON_INTERPRET=1  # the Triton variants run (untimed) under the interpreter
else
    PY=${PYTHON:-python3}
fi
OUT=${OUT:?set OUT: the folder for the results}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
RES=$WORK/results
LOGS=$WORK/logs
mkdir -p "$RES" "$LOGS"
SUMMARY=$WORK/summary.txt
export PYTHONUNBUFFERED=1
: >"$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - T0))); }

# stage NAME LIMIT_S CMD...: run CMD with its output in logs/NAME.log, killed after min(LIMIT_S, time left
# - 15 s for packing); one line per stage in summary.txt whatever happens.
stage() {
    local name=$1 limit=$2
    shift 2
    local avail=$(($(left) - 15))
    [ "$limit" -gt "$avail" ] && limit=$avail
    if [ "$limit" -lt 10 ]; then
        printf '%-22s skipped (no time left)\n' "$name" | tee -a "$SUMMARY"
        return 0
    fi
    local s rc
    s=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee "$LOGS/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
    rc=$?
    local verdict=ok
    [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    printf '%-22s %-28s %4ss\n' "$name" "$verdict" $(($(date +%s) - s)) | tee -a "$SUMMARY"
    [ "$rc" -ne 0 ] && tail -n 15 "$LOGS/$name.log"
    return 0
}

# -P: the checkout must not shadow the installed package (its source tree has no built _ext).
BENCH=("$PY" -P -m cbramod_fast bench)

if [ "$DRY" = 1 ]; then
    DEV=cpu PRESET="--preset tiny" TRAIN_SHAPES=(4x3 3x2) TRAIN_BATCH=1,2 INFER_SHAPE=4x3 REP_TRAIN=2 REP_INFER=3
else
    DEV=cuda PRESET="--preset base" TRAIN_SHAPES=(19x30 12x10) TRAIN_BATCH=64,256 INFER_SHAPE=19x30 REP_TRAIN=15 REP_INFER=100
fi
# (a) reference fp32 eager; (b) torch-native bf16 candidates: the reference (nn.MultiheadAttention, i.e.
# SDPA) and the fast model's torch path, each compiled per layer (regional compilation: one layer's
# compile time instead of twelve); (c) ours, eager and compiled per layer around the kernels.
TRAIN_VARIANTS=reference:fp32,reference:bf16:compile-layers,torch:bf16:compile-layers,triton:bf16,triton:bf16:compile-layers
INFER_VARIANTS=reference:fp32,reference:bf16,reference:bf16:graph,torch:bf16:graph,triton:bf16,triton:bf16:graph,triton:fp32:graph
# Whole-model torch.compile, last: minutes of Inductor per variant and group.
FULL_VARIANTS=reference:bf16:compile,torch:bf16:compile,triton:bf16:compile
RO_VARIANTS=reference:bf16:compile-ro,triton:bf16:compile-ro
ORIG=()
if [ -n "${CBRAMOD_ORIGINAL:-}" ] && [ -f "$CBRAMOD_ORIGINAL/models/cbramod.py" ]; then
    ORIG=(--original "$CBRAMOD_ORIGINAL")
    TRAIN_VARIANTS=original:fp32,$TRAIN_VARIANTS INFER_VARIANTS=original:fp32,$INFER_VARIANTS
fi
if [ "$DRY" = 1 ]; then
    # The GPU lists must still parse; the CPU run drops the tags (graphs need CUDA, Inductor on 2 shared
    # cores takes minutes per variant; tests/test_benchmark.py covers the tag plumbing).
    "$PY" -P -c "import sys; from cbramod_fast.benchmark.config import parse_variants as p; [p(a) for a in sys.argv[1:]]" \
        "$TRAIN_VARIANTS" "$INFER_VARIANTS" "$FULL_VARIANTS" "$RO_VARIANTS" || exit 1
    strip() { echo "$1" | tr ',' '\n' | cut -d: -f1,2 | sort -u | paste -sd, -; }
    TRAIN_VARIANTS=$(strip "$TRAIN_VARIANTS") INFER_VARIANTS=$(strip "$INFER_VARIANTS")
    FULL_VARIANTS=$(strip "$FULL_VARIANTS") RO_VARIANTS=$(strip "$RO_VARIANTS")
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu',
torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|scikit-build-core|pybind11|cmake|ninja|pytest|pytest-benchmark|numpy|scipy|matplotlib) '
    git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git metadata in this copy)"
} 2>&1 | tee "$LOGS/versions.log"

if [ "$DRY" = 1 ]; then
    echo "dry run: skipping the install (the dev venv has the editable install)" | tee "$LOGS/install.log"
else
    stage install 240 "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir .
fi
stage import 30 "$PY" -P -c "import cbramod_fast, cbramod_fast._ext; from cbramod_fast.kernels import criss_cross; print('ok', cbramod_fast.__file__)"

PYTEST=("$PY" -P -m pytest -q -p no:cacheprovider)
[ "$DRY" = 1 ] && PYTEST+=(--collect-only)
# Kernel correctness on the GPU first (the same tests CI runs under the interpreter, at GPU speed, plus
# the gpu-marked benchmark shapes and CUDA-graph capture), then the other gpu-marked tests.
stage test_kernels 150 "${PYTEST[@]}" tests/test_kernels_criss_cross.py tests/test_kernels_masking.py
for shape in "${TRAIN_SHAPES[@]}"; do
    stage "train_$shape" 150 "${BENCH[@]}" --device $DEV $PRESET --mode train --shapes "$shape" --batch $TRAIN_BATCH \
        --variants "$TRAIN_VARIANTS" "${ORIG[@]}" --repeats $REP_TRAIN --warmup 2 --plot --out "$RES/train_$shape"
done
stage infer_graphs 90 "${BENCH[@]}" --device $DEV $PRESET --mode infer --shapes $INFER_SHAPE --batch 1 \
    --variants "$INFER_VARIANTS" "${ORIG[@]}" --repeats $REP_INFER --warmup 3 --out "$RES/infer_graphs"
GPU_SLUG=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
mkdir -p "$RES/kernels"
stage bench_kernels 120 "${PYTEST[@]}" bench/bench_kernels.py --benchmark-only \
    --benchmark-json="$RES/kernels/kernels_$GPU_SLUG.json" --benchmark-columns=min,median,iqr,rounds
stage test_gpu_marked 120 "${PYTEST[@]}" -m gpu tests/ --ignore=tests/test_kernels_criss_cross.py \
    --ignore=tests/test_kernels_masking.py
# Whole-model compilation, if time is left: EEG 19x30 at B = 64, and inference through Inductor's graphs.
stage train_fullcompile 180 "${BENCH[@]}" --device $DEV $PRESET --mode train --shapes "${TRAIN_SHAPES[0]}" \
    --batch "${TRAIN_BATCH%%,*}" --variants "reference:fp32,triton:bf16,$FULL_VARIANTS" --repeats $REP_TRAIN \
    --warmup 2 --out "$RES/train_fullcompile"
stage infer_compile_ro 120 "${BENCH[@]}" --device $DEV $PRESET --mode infer --shapes $INFER_SHAPE --batch 1 \
    --variants "reference:fp32,triton:bf16,$RO_VARIANTS" --repeats $REP_INFER --warmup 3 --out "$RES/infer_compile_ro"

# Pack: the tables travel as files and in the printed tail; everything in one archive.
{
    echo
    echo "stages above; budget ${BUDGET}s, used $(($(date +%s) - T0))s"
    for md in "$RES"/*/*.md; do
        [ -f "$md" ] || continue
        echo
        echo "## $(basename "$(dirname "$md")"): $(basename "$md")"
        # the device header and the summary table (the full table is in the file)
        awk '/^- device:/{p=1} /^\| mode \| C×N \| batch \| variant/{exit} p' "$md"
    done
    if [ -f "$LOGS/bench_kernels.log" ]; then
        echo
        echo "## kernel benchmarks (median per group; full numbers in results/kernels/)"
        grep -E "^(test_attention|test_dual_mask)|^-+ benchmark" "$LOGS/bench_kernels.log" | cut -c1-110 | head -80
    fi
} >>"$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
for md in "$RES"/*/*.md; do  # at most 8 files come back: summary, archive and up to 5 tables
    [ -f "$md" ] && [ "$(ls "$OUT" | wc -l)" -lt 7 ] && cp "$md" "$OUT/$(basename "$(dirname "$md")").md"
done
tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" results logs summary.txt
echo
cat "$SUMMARY"
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
