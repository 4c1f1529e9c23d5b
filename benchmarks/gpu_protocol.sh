#!/usr/bin/env bash
# The paper's protocol timed on a GPU: run from the repository root on a machine with a CUDA GPU, torch and
# transformers; needs no network and no weights (the 1.3B shape is built from a config with random weights).
# One command, under 10 minutes on an H200 (the script stops itself at 9):
#     bash benchmarks/gpu_protocol.sh              # or: bash benchmarks/gpu_protocol.sh --dry-run   (CPU, seconds)
# What it prints is described in benchmarks/gpu_protocol.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ICLGD_CACHE="${ICLGD_CACHE:-$(mktemp -d)}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
# preflight: every module the compare path imports (gguf is not needed: no GGUF model is loaded)
"$PY" - <<'PYEOF'
import importlib.util, sys
need = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "pandas", "pydantic", "typer", "tqdm",
        "matplotlib", "accelerate"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_protocol: missing Python packages {', '.join(missing)} (pip install them, or carry a wheel folder)")
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"CUDA {torch.cuda.is_available()}", flush=True)
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
timeout 540 "$PY" benchmarks/gpu_protocol.py "$@"
