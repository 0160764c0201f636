#!/usr/bin/env bash
# `make gpu-check`: benchmarks/gpu_check.py on this machine's NVIDIA GPU, writing gpu-check.md/json
# into $OUT (the device tool sets it) or the repository root. Extra arguments go to the script
# (e.g. --budget 300, --parts kernels,engine).
#
# Which Python: $GPU_PYTHON if set; else .venv/bin/python when its torch sees a GPU; else python3 when
# its torch does (the device image); else `scripts/install.sh` builds .venv (the CUDA torch from PyPI).
# The web stack that image lacks (fastapi, uvicorn, pydantic, ...) is installed from wheels in .whl/
# (scripts/fetch_gpu_wheels.sh, run beforehand where PyPI is reachable; run here if the folder is
# missing) into $GPU_SITE with pip --no-index --target and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ -n "${GPU_PYTHON:-}" ]; then PY=$GPU_PYTHON
elif [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then PY=.venv/bin/python
elif has_cuda_torch python3; then PY=python3
else
  command -v nvidia-smi >/dev/null || { echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found)"; exit 2; }
  bash scripts/install.sh .venv python3 && PY=.venv/bin/python
fi

MODULES="torch triton transformers peft safetensors prometheus_client httpx fastapi uvicorn pydantic pydantic_settings multipart"
missing() { "$PY" -c "import importlib.util as u; print(' '.join(m for m in '$MODULES'.split() if u.find_spec(m) is None))"; }
if [ -n "$(missing)" ]; then
  SITE=${GPU_SITE:-/tmp/loraplex-gpu-site}
  compgen -G ".whl/*.whl" >/dev/null || PYTHON="$PY" bash scripts/fetch_gpu_wheels.sh .whl
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  still=$(missing)
  [ -z "$still" ] || { echo "gpu-check: still missing: $still (torch/triton/transformers/peft come from 'make setup')"; exit 2; }
fi
echo "gpu-check with $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
exec "$PY" -m benchmarks.gpu_check --out "${OUT:-.}" "$@"
