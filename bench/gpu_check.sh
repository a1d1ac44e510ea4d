#!/usr/bin/env bash
# One command for a lent CUDA machine (about 6 minutes, under 8): the CUDA tests, the GPU benchmarks, the moonshot.
#
#   bash bench/gpu_check.sh                 from the repository root (or anywhere: it cds there)
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Needs a Python with CUDA torch, transformers, accelerate, bitsandbytes, safetensors, tokenizers, psutil, pytest
# (.venv/bin/python when it exists, else python3); nothing is downloaded. Prints, and writes under $OUT (the
# device tool's output folder; bench/out/gpu_check without it) as gpu_check.log, gpu_bench.jsonl, moonshot.json:
#   1. the tests marked `cuda` (captured decode step == eager, offload on GPU + pinned RAM + disk, ...),
#   2. resident fp16 and nf4 decode at batch 1, 4, 16: neoxlite with its captured decode step and eager, against
#      transformers' eager generate / transformers + bitsandbytes, with the share of the weight-read bound;
#      then fp16 batch 1 against transformers with a static cache + torch.compile,
#   3. the moonshot: GPT-NeoX-20B-shaped nf4 (written pre-quantized layer by layer) under gpu_memory=8GiB,
#      cpu_memory=16GiB at batch 1 and 16: tok/s, share of the PCIe bound, peak GPU memory and RSS vs budgets.
# Every section runs even when one before it fails; the exit status and the last line say which failed.
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1  # nothing is fetched; output arrives as it is made
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
FIGURES="${OUT:-bench/out/gpu_check}"
mkdir -p "$FIGURES" || { echo "cannot create $FIGURES"; exit 1; }
rm -f "$FIGURES/gpu_bench.jsonl" "$FIGURES/moonshot.json"
exec > >(tee "$FIGURES/gpu_check.log") 2>&1
start=$(date +%s)
failed=()

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "FAILED: no nvidia-smi"; exit 1; }
"$PY" - <<'PYEOF' || { echo "FAILED: the Python environment"; exit 1; }
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
missing = [m for m in ("transformers", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "psutil", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (scripts/setup.sh test installs them where pip can reach)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PYEOF

echo "== CUDA tests ($(( $(date +%s) - start )) s)"
# Modules whose imports are missing here (gradio for the app tests) are reported, and the CUDA tests still run.
timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs --durations=5 --continue-on-collection-errors tests/ \
    || failed+=("cuda tests")

echo "== GPU benchmarks ($(( $(date +%s) - start )) s)"
timeout 170 "$PY" bench/gpu_bench.py --shape pythia-1.4b --batches 1 4 16 --tokens 32 --skip offloaded \
    --out "$FIGURES/gpu_bench.jsonl" || failed+=("gpu_bench")

echo "== moonshot ($(( $(date +%s) - start )) s)"
timeout 150 "$PY" bench/moonshot_20b.py --batches 1 16 --tokens 8 --out "$FIGURES/moonshot.json" \
    || failed+=("moonshot")

if [ ${#failed[@]} -gt 0 ]; then
    echo "== FAILED: ${failed[*]} (after $(( $(date +%s) - start )) s)"
    exit 1
fi
echo "== all passed in $(( $(date +%s) - start )) s; figures in $FIGURES"
