#!/usr/bin/env bash
# One command for a lent CUDA machine (about 5 minutes, under 8): the CUDA tests, then the GPU benchmarks.
#
#   bash bench/gpu_check.sh                 from the repository root (or anywhere: it cds there)
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Needs a Python with CUDA torch, transformers, accelerate, bitsandbytes, safetensors, tokenizers, psutil, pytest
# (.venv/bin/python when it exists, else python3); nothing is downloaded. Prints:
#   1. the tests marked `cuda` (offload on GPU + pinned RAM + disk, GPU budget held, quantized streaming, ...),
#   2. resident fp16 and nf4 decode: neoxlite vs transformers (+ bitsandbytes), and the GPU's weight-read bound,
#   3. offloaded fp16 decode under a 1 GiB GPU budget: neoxlite vs accelerate's CPU offload with the same budget,
#      at batch 1, 4, 16, with the PCIe bound (bytes moved per step / measured pinned host-to-device bandwidth).
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1  # nothing is fetched; output arrives as it is made
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
start=$(date +%s)
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no nvidia-smi"; exit 1; }
"$PY" - <<'EOF' || exit 1
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
missing = [m for m in ("transformers", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "psutil", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (scripts/setup.sh test installs them where pip can reach)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF

echo "== CUDA tests"
# Modules whose imports are missing here (gradio for the app tests) are reported, and the CUDA tests still run.
timeout 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs --durations=5 --continue-on-collection-errors tests/ \
    || status=1

echo "== GPU benchmarks"
timeout 300 "$PY" bench/gpu_bench.py --shape pythia-1.4b --gpu-memory 1GiB --batches 1 4 16 --tokens 32 || status=1

echo "== done in $(( $(date +%s) - start )) s (status $status)"
exit $status
