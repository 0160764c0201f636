#!/usr/bin/env bash
# Creates the virtualenv and installs loraplex with its test extras.
# Torch comes first and explicitly: an unpinned `torch` from PyPI is a multi-GB CUDA build,
# which a CPU-only machine neither needs nor wants.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${2:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install -q "torch>=2.6"                    # CUDA build from PyPI
  elif compgen -G "/opt/wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
    "${PIP[@]}" install -q /opt/wheels/torch-2.13.0+cpu-*.whl   # local CPU wheel (this workplace)
  elif "${PIP[@]}" download -q --no-deps -d /tmp/lp-probe "torch==2.13.0" --index-url \
        https://download.pytorch.org/whl/cpu >/dev/null 2>&1; then
    "${PIP[@]}" install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  else
    "${PIP[@]}" install -q "torch==2.13.0"
  fi
fi
"${PIP[@]}" install -q -e ".[test]"
