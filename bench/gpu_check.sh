#!/usr/bin/env bash
# The GPU check in one go, sized to finish within 7 minutes including the install. Stages in priority order:
#
#   install        pip install --no-build-isolation --no-deps --no-index . ; if the C++ build fails, the
#                  rest runs from the source tree (the Triton kernels, their tests and the GPU benchmark need
#                  no C++)
#   import         the package imports (with its C++ extension unless the build failed)
#   test_kernels   the kernel tests CI runs under the Triton interpreter, here compiled on the GPU
#   bench_kernels  attention vs SDPA and the PyTorch twin, dual mask, masked MSE (bench/bench_kernels.py)
#   train_eager    training-step table, eager: 19x30 and 12x10, B = 256 and 64; original / reference fp32,
#                  reference and our torch path in bf16, ours with the Triton kernels in bf16
#   train_compile  one compiled variant: the reference in bf16 + torch.compile per layer, against ours eager
#   infer_graphs   B = 1 19x30 inference latency, eager and replayed CUDA graphs
#   loader         the loader's feed rate (bench/bench_loader.py, skipped when the checkout has none)
#   test_gpu       if time is left: the gpu-marked tests (benchmark shapes, CUDA-graph replay, Inductor, the
#                  registers of the L = 64 kernels)
#   compile_more   if time is left: our torch path and our Triton path compiled per layer
#
#   OUT=DIR bash bench/gpu_check.sh              # on a CUDA machine; results in DIR
#   bash bench/gpu_check.sh --dry-run            # on CPU: the same stages on the tiny preset, the Triton
#                                                # variants under the interpreter, tests only collected
#
# Each stage has its own time limit and log; the limits of the first eight, with the versions step and the
# packing reserve, add up to the 420-s budget (GPU_CHECK_BUDGET_S). A stage may use what earlier ones left;
# the last two run only on what is left. A slow or failing stage costs only itself, and every benchmark
# writes its results as it goes (cbramod-fast bench after each group, the pytest-benchmark stages after
# each test), so a stage stopped at its limit keeps what it finished. The compiled Triton kernels'
# registers and spills are printed after each pytest stage. GPU_CHECK_ONLY=stage,stage runs only those
# stages (e.g. to redo one).
# DIR gets summary.txt (stage table, benchmark summaries, kernel tables; also printed last), the bench
# markdown tables and gpu_check.tar.gz with every JSON / markdown / PNG and log. To commit results: tar xzf
# gpu_check.tar.gz, copy the .json / .md / .png files of results/*/ to bench/results/, run
# `python bench/report.py`.
#
# Needs torch, triton, scikit-build-core, pybind11, cmake, ninja, pytest, pytest-benchmark, numpy, scipy,
# matplotlib, tqdm; not wfdb or pyedflib (the benchmark input is a shipped array; tests needing them skip).
# CBRAMOD_ORIGINAL=PATH adds the original implementation (a checkout of github.com/wjq-learning/CBraMod;
# its models/ folder is enough) as a variant.
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
# Paths given relative to where the check was started, before it moves to the checkout's root.
[ -n "${OUT:-}" ] && { mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1; }
if [ -n "${CBRAMOD_ORIGINAL:-}" ]; then
    CBRAMOD_ORIGINAL=$(cd "$CBRAMOD_ORIGINAL" 2>/dev/null && pwd) || CBRAMOD_ORIGINAL=/nonexistent
fi
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
    SCALE=3  # CPU, tiny preset, maybe shared cores: generous limits, same stages
    OUT=${OUT:-/tmp/gpu_check_dry_out}
    DEFAULT_PY=python3
    [ -x "$REPO/.venv/bin/python" ] && DEFAULT_PY=$REPO/.venv/bin/python
    PY=${PYTHON:-$DEFAULT_PY}
    export TRITON_INTERPRET=1  # the Triton variants run (checked, untimed) under the interpreter
else
    SCALE=1
    PY=${PYTHON:-python3}
fi
BUDGET=${GPU_CHECK_BUDGET_S:-$((420 * SCALE))}
RESERVE=10  # seconds kept for packing the results
OUT=${OUT:?set OUT: the folder for the results}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXX")
trap 'rm -rf "$WORK"' EXIT  # everything in it ends up in $OUT/gpu_check.tar.gz
RES=$WORK/results
LOGS=$WORK/logs
mkdir -p "$RES/kernels" "$RES/loader" "$LOGS"
SUMMARY=$WORK/summary.txt
# PYTHONSAFEPATH (python -P): the checkout must not shadow the installed package, whose C++ extension its
# source tree lacks.
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
: >"$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - T0))); }
line() { printf '%-14s %s\n' "$1" "$2" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S CMD...: CMD with its output in logs/NAME.log, stopped after min(LIMIT_S x SCALE, time
# left - RESERVE); one line in summary.txt whatever happens. Returns CMD's exit status.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
        return 0
    fi
    local avail=$(($(left) - RESERVE))
    [ "$limit" -gt "$avail" ] && limit=$avail
    if [ "$limit" -lt 10 ]; then
        line "$name" "skipped (no time left)"
        return 0
    fi
    local s rc verdict=ok
    s=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee "$LOGS/$name.log"
    timeout --kill-after=5 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
    rc=$?
    [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && verdict="TIMED OUT after ${limit}s"
    line "$name" "$(printf '%-28s %4ss' "$verdict" $(($(date +%s) - s)))"
    [ "$rc" -ne 0 ] && tail -n 15 "$LOGS/$name.log"
    return "$rc"
}

BENCH=("$PY" -m cbramod_fast bench)
PYTEST=("$PY" -m pytest -p no:cacheprovider -p cbramod_fast.benchmark.pytest_report)
if [ "$DRY" = 1 ]; then
    PYTEST+=(--collect-only -q)
    DEV=cpu PRESET="--preset tiny" TRAIN_SHAPES=3x2 TRAIN_BATCH=2,1 BIG_BATCH=2 INFER_SHAPE=3x2
    REP_TRAIN=2 REP_INFER=2
else
    PYTEST+=(-v -rfEs --durations=10)
    DEV=cuda PRESET="--preset base" TRAIN_SHAPES=19x30,12x10 TRAIN_BATCH=256,64 BIG_BATCH=256
    INFER_SHAPE=19x30
    REP_TRAIN=10 REP_INFER=50
fi
BIG_SHAPE=${TRAIN_SHAPES%%,*}
# (a) the original (with CBRAMOD_ORIGINAL) and the reference in fp32 eager; (b) torch-native bf16: the
# reference (nn.MultiheadAttention, i.e. SDPA) and our torch path; (c) ours with the Triton kernels.
TRAIN_EAGER=reference:fp32,reference:bf16,torch:bf16,triton:bf16
# One compiled variant, the torch-native candidate for (b) (regional compilation: one layer's compile time
# instead of twelve), with ours eager in the same run so their ratio comes from interleaved rounds.
TRAIN_COMPILE=reference:bf16:compile-layers,triton:bf16
INFER_GRAPHS=reference:fp32,reference:bf16:graph,torch:bf16:graph
INFER_GRAPHS=$INFER_GRAPHS,triton:bf16,triton:bf16:graph,triton:fp32:graph
COMPILE_MORE=triton:bf16,torch:bf16:compile-layers,triton:bf16:compile-layers
ORIG=()
if [ -n "${CBRAMOD_ORIGINAL:-}" ]; then
    if [ -f "$CBRAMOD_ORIGINAL/models/cbramod.py" ]; then
        ORIG=(--original "$CBRAMOD_ORIGINAL")
        TRAIN_EAGER=original:fp32,$TRAIN_EAGER INFER_GRAPHS=original:fp32,$INFER_GRAPHS
    else
        echo "CBRAMOD_ORIGINAL has no models/cbramod.py: the original is left out" | tee -a "$SUMMARY"
    fi
fi
if [ "$DRY" = 1 ]; then
    # The GPU lists must still parse; the CPU run drops the tags (graphs need CUDA, Inductor on 2 shared
    # cores takes minutes per variant; tests/test_benchmark.py covers the tag plumbing).
    "$PY" -c "import sys; from cbramod_fast.benchmark.config import parse_variants as p
for a in sys.argv[1:]: p(a)" \
        "$TRAIN_EAGER" "$TRAIN_COMPILE" "$INFER_GRAPHS" "$COMPILE_MORE" || exit 1
    strip() { echo "$1" | tr ',' '\n' | cut -d: -f1,2 | awk '!seen[$0]++' | paste -sd, -; }
    TRAIN_EAGER=$(strip "$TRAIN_EAGER") TRAIN_COMPILE=$(strip "$TRAIN_COMPILE")
    INFER_GRAPHS=$(strip "$INFER_GRAPHS") COMPILE_MORE=$(strip "$COMPILE_MORE")
fi

{
    date -u
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
        2>&1 || true
    timeout 30 "$PY" -c "import sys, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| triton', triton.__version__, '| gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" \
        2>&1
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|scikit.build.core|pybind11|cmake|ninja|pytest|'\
'pytest-benchmark|numpy|scipy|matplotlib|tqdm) '
    git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git metadata in this copy)"
} 2>&1 | tee "$LOGS/versions.log"

if [ "$DRY" = 1 ]; then  # leave the development install alone: resolve and prepare offline, build nothing
    INSTALL=("$PY" -m pip install --dry-run --no-build-isolation --no-deps --no-index --quiet .)
else
    INSTALL=(env PIP_BREAK_SYSTEM_PACKAGES=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install
             --no-build-isolation --no-deps --no-index --no-cache-dir .)
fi
FROM_SOURCE=0
if ! stage install 90 "${INSTALL[@]}"; then
    FROM_SOURCE=1
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    line "" "install failed: the rest runs from the source tree, without the C++ extension"
fi
EXT=", cbramod_fast._ext"
[ "$FROM_SOURCE" = 1 ] && EXT=""
stage import 15 "$PY" -c "import cbramod_fast$EXT; from cbramod_fast.kernels import criss_cross
print('ok', cbramod_fast.__file__)"

stage test_kernels 80 "${PYTEST[@]}" -m "not gpu" --kernel-stats "$RES/kernels/stats_test_kernels.json" \
    tests/test_kernels_criss_cross.py tests/test_kernels_masking.py
SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' |
       sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
SLUG=${SLUG:-cpu}
# --benchmark-lines: each result as its test ends (the JSON file comes only at the end of the run)
stage bench_kernels 50 "${PYTEST[@]}" bench/bench_kernels.py --benchmark-only \
    --benchmark-json="$RES/kernels/bench_kernels_$SLUG.json" --benchmark-columns=min,median,iqr,rounds \
    --benchmark-lines "$RES/kernels/bench_kernels_$SLUG.jsonl" \
    --kernel-stats "$RES/kernels/stats_bench_kernels.json"
stage train_eager 45 "${BENCH[@]}" --device $DEV $PRESET --mode train --shapes "$TRAIN_SHAPES" \
    --batch "$TRAIN_BATCH" --variants "$TRAIN_EAGER" "${ORIG[@]}" --repeats $REP_TRAIN --warmup 2 --plot \
    --out "$RES/train_eager"
stage train_compile 70 "${BENCH[@]}" --device $DEV $PRESET --mode train --shapes "$BIG_SHAPE" \
    --batch "$BIG_BATCH" --variants "$TRAIN_COMPILE" --repeats $REP_TRAIN --warmup 2 \
    --out "$RES/train_compile"
stage infer_graphs 30 "${BENCH[@]}" --device $DEV $PRESET --mode infer --shapes $INFER_SHAPE --batch 1 \
    --variants "$INFER_GRAPHS" "${ORIG[@]}" --repeats $REP_INFER --warmup 3 --out "$RES/infer_graphs"
if [ -f bench/bench_loader.py ]; then
    stage loader 20 "${PYTEST[@]}" bench/bench_loader.py --benchmark-only \
        --benchmark-json="$RES/loader/bench_loader_$SLUG.json" \
        --benchmark-lines "$RES/loader/bench_loader_$SLUG.jsonl"
elif [ -z "${GPU_CHECK_ONLY:-}" ] || [[ ",$GPU_CHECK_ONLY," == *",loader,"* ]]; then
    line loader "skipped (no bench/bench_loader.py in this checkout)"
fi
# What is left of the budget: the gpu-marked tests, then more compiled variants.
stage test_gpu 150 "${PYTEST[@]}" -m gpu --kernel-stats "$RES/kernels/stats_test_gpu.json" tests/
stage compile_more 150 "${BENCH[@]}" --device $DEV $PRESET --mode train --shapes "$BIG_SHAPE" \
    --batch "$BIG_BATCH" --variants "$COMPILE_MORE" --repeats $REP_TRAIN --warmup 2 --out "$RES/compile_more"

# Pack: the tables travel as files and in the printed tail; everything in one archive.
tables() {
    "$PY" -c 'import sys; from cbramod_fast.benchmark.pytest_report import main
sys.exit(main(sys.argv[1:]))' "$@" 2>&1
}
{
    echo
    echo "stages above; budget ${BUDGET}s, used $(($(date +%s) - T0))s"
    for md in "$RES"/*/*.md; do
        [ -f "$md" ] || continue
        echo
        echo "## $(basename "$(dirname "$md")"): $(basename "$md")"
        # the run header and the (a)/(b)/(c) summary (the full table is in the file)
        awk '/^- device:/{p=1} /^\| mode \| C×N \| batch \| variant/{exit} p' "$md"
    done
    for f in "$RES"/kernels/bench_kernels_*.jsonl "$RES"/loader/*.jsonl; do  # there even if a run stopped
        [ -s "$f" ] && { echo; tables "$f"; }
    done
    for f in "$RES"/kernels/stats_*.json; do  # in full for the benchmark shapes, in brief for the tests
        brief=(--brief)
        [ "$(basename "$f")" = stats_bench_kernels.json ] && brief=()
        [ -s "$f" ] && { echo; tables "${brief[@]}" "$f"; }
    done
} >>"$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
for md in "$RES"/*/*.md; do  # at most 7 files: the summary, the archive and up to 5 tables
    [ -f "$md" ] && [ "$(ls "$OUT" | wc -l)" -lt 6 ] && cp "$md" "$OUT/$(basename "$(dirname "$md")").md"
done
tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" results logs summary.txt
echo
cat "$SUMMARY"
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
