#!/usr/bin/env bash
# Creates ./.venv with neoxlite installed in editable mode.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test extras (transformers, gradio_client, playwright, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q torch          # CUDA build
    else
        .venv/bin/python -m pip install -q torch==2.13.0  # the CPU build where pip finds one (a wheel folder or index; PyPI serves a CUDA build, which runs on the CPU too)
    fi
fi
if [ "$extra" = "test" ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
else
    .venv/bin/python -m pip install -q -e .
fi
