#!/usr/bin/env bash
# Fetches the wheels `make gpu-check` needs on a GPU machine whose Python already has torch, triton,
# transformers, peft, safetensors, prometheus-client, httpx, anyio, click and h11 but not the web stack
# (the device image: CPython 3.12, x86-64 Linux, no package index). Run it where PyPI is reachable;
# scripts/gpu_check.sh installs them offline from that folder (pip --no-index --target).
#
#   bash scripts/fetch_gpu_wheels.sh [DEST=.whl]      (DEST is git-ignored; about 3 MiB)
#
# Versions are the ones the test suite runs with; one version of each, --no-deps (the list is complete
# for that image: typing-extensions is brought too, as pydantic needs a recent one, and fastapi imports
# opentelemetry-api).
set -euo pipefail
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0
  opentelemetry-api==1.45.2
)
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -1 "$DEST"
du -sh "$DEST"
