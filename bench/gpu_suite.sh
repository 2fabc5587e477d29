#!/usr/bin/env bash
# Every GPU measurement in one prepared command, within 9 minutes on an H100 / H200:
#
#   bash bench/gpu_suite.sh OUT_DIR            # on the GPU machine, after
#                                              #   pip install --no-deps --no-build-isolation -e .
#   bash bench/gpu_suite.sh OUT_DIR --dry-run  # on CPU, at tiny shapes (what CI can check)
#
# Stages, each under its own time limit (a stage cut short keeps the cases it finished):
#   1. the Triton kernel and backend tests, kernels compiled (tests_<gpu>.log);
#   2. bench/e2e_bench.py at LLaVA-1.5-7B shapes, batch 1 and 8 with the authors-style
#      baseline, then batch 32 without it; then LLaVA-NeXT-7B shapes, batch 1 and 8: dense vs
#      v1.5 and v2 at budgets 128 and 64, sdpa, bf16; then LLaVA-1.5-7B batch 1 with the decoder
#      layers compiled (sve.compile_decoder), dense vs v1.5 and v2 at budget 128
#      (e2e_<gpu>.json and two plots);
#   3. the kernel microbenchmarks (kernels_<gpu>.json and .png).
# It writes at most 6 files to OUT_DIR, all named after the GPU, for committing under
# bench/results/, and prints a PASS / FAIL table last (bench/suite_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [--dry-run]}
DRY=${2:-}
PY=${PYTHON:-python}
mkdir -p "$OUT"
STAGES="$OUT/.stages"
: > "$STAGES"

if [ "$DRY" = "--dry-run" ]; then
    GPU=cpu
    E2E=(--device cpu --new-tokens 3 --repeats-scale 0.2)
    LLAVA=llava-1.5-tiny NEXT=llava-next-tiny SMALL_BATCHES=(1 2) BIG_BATCH=3
    KERNEL_TESTS=(tests/test_kernel_select.py)  # the interpreter is slow: one file shows the stage works
    LIMITS=(120 240 120 60 60 300)
else
    GPU=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))") || exit 1
    E2E=(--device cuda --new-tokens 16 --repeats-scale 0.5)
    LLAVA=llava-1.5-7b NEXT=llava-next-7b SMALL_BATCHES=(1 8) BIG_BATCH=32
    KERNEL_TESTS=(tests/test_kernel_queries.py tests/test_kernel_raters.py tests/test_kernel_relevance.py
                  tests/test_kernel_select.py tests/test_kernel_select_step.py tests/test_kernel_recycle.py
                  tests/test_kernel_compact.py tests/test_launch_count.py tests/test_triton_backend.py)
    LIMITS=(70 135 75 35 20 130)  # 540 s in all
fi
E2E+=(--out "$OUT" --name "e2e_$GPU" --presets v1.5 v2 --budgets 128 64 --attn sdpa)

stage() {  # stage NAME LIMIT_S COMMAND...: run it under a time limit, record its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "$name $rc $((SECONDS - start)) $limit" >> "$STAGES"
}

stage kernel-tests "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider "${KERNEL_TESTS[@]}" \
    > "$OUT/tests_$GPU.log" 2>&1
stage e2e-llava-1.5 "${LIMITS[1]}" "$PY" bench/e2e_bench.py "${E2E[@]}" --shapes "$LLAVA" --batches "${SMALL_BATCHES[@]}"
stage e2e-llava-1.5-b32 "${LIMITS[2]}" "$PY" bench/e2e_bench.py "${E2E[@]}" --resume --no-authors \
    --shapes "$LLAVA" --batches "$BIG_BATCH"
stage e2e-llava-next "${LIMITS[2]}" "$PY" bench/e2e_bench.py "${E2E[@]}" --resume --shapes "$NEXT" \
    --batches "${SMALL_BATCHES[@]}"
stage e2e-llava-1.5-compiled "${LIMITS[5]}" "$PY" bench/e2e_bench.py "${E2E[@]}" --resume --no-authors \
    --shapes "$LLAVA" --batches 1 --budgets 128 --attn sdpa+compiled
stage e2e-report "${LIMITS[4]}" "$PY" bench/e2e_bench.py "${E2E[@]}" --report-only
if [ "$DRY" = "--dry-run" ]; then
    echo "kernel-bench skipped 0 ${LIMITS[3]}" >> "$STAGES"
else
    stage kernel-bench "${LIMITS[3]}" "$PY" bench/kernel_bench.py --quick --out "$OUT"
fi
"$PY" bench/suite_summary.py "$OUT" "$GPU"
