#!/usr/bin/env bash
# The llama.cpp peer: `llama-server` and `llama-batched-bench`, built from the llama.cpp sources
# vendored in the llama-cpp-python sdist on PyPI (the only registry reachable here), cached.
#
#   scripts/peers/build_llamacpp.sh [PEERS_DIR]   (default .peers; `make bench-peer` calls it)
#
# -DGGML_NATIVE=ON builds for this CPU's instruction set (AVX-512, avx512_bf16 where present), as a
# user building llama.cpp for a CPU server would. ~10 min on 2 cores; later calls reuse the build.
set -euo pipefail
PEERS=${1:-.peers}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PYTHON=${PYTHON:-python3}
SRC="$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
BUILD="$PEERS/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
JOBS=${JOBS:-$(nproc)}

if [ -x "$BUILD/bin/llama-server" ] && [ -x "$BUILD/bin/llama-batched-bench" ]; then
  echo "llama.cpp peer: cached in $BUILD"
  exit 0
fi
start=$(date +%s)
mkdir -p "$PEERS/src"
sdist="$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$PEERS/src" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
[ -d "$SRC" ] || tar -xzf "$sdist" -C "$PEERS/src"
# llama.cpp's logger is asynchronous and deliberately never torn down (its issue 22142), so
# llama-batched-bench sometimes exits before its result line is written (a third of the runs here).
# One flush before it returns; nothing it measures changes.
bench="$SRC/tools/batched-bench/batched-bench.cpp"
grep -q "common_log_flush" "$bench" || perl -0pi -e \
  's/(    llama_backend_free\(\);\n\n    return 0;\n\}\s*)$/    llama_backend_free();\n\n    common_log_flush(common_log_main());\n    return 0;\n}\n/' "$bench"
grep -q "common_log_flush" "$bench" || { echo "could not add the log flush to $bench" >&2; exit 1; }

cmake -S "$SRC" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF >/dev/null
cmake --build "$BUILD/cmake" --config Release -j "$JOBS" --target llama-server llama-batched-bench
mkdir -p "$BUILD/bin"
cp "$BUILD/cmake/bin/llama-server" "$BUILD/cmake/bin/llama-batched-bench" "$BUILD/bin/"
"$BUILD/bin/llama-server" --version 2>&1 | head -n 2
echo "llama.cpp peer: built in $(( $(date +%s) - start )) s"
