#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (the strongest anchor of the benchmarks) from the llama.cpp
# sources that our llama-cpp-python release vendors, with the same CMake flags as our wheel, and
# caches it under a key made from those flags. Prints the binary's path. Safe to run again.
#
# The sources come from llama-cpp-python's sdist on PyPI; no code of it is kept in this repository.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/llama-cpp-build.sh
source scripts/llama-cpp-build.sh

CMAKE_ARGS=$(cmake_args_for_this_cpu)
KEY=$(printf '%s|%s|%s|server' "$LLAMA_VERSION" "$CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-16)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/multiserve/llama-server/$KEY"
BINARY="$CACHE/llama-server"

if [ ! -x "$BINARY" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  echo "Building llama-server $LLAMA_VERSION with: $CMAKE_ARGS (several minutes, once)" >&2
  python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$WORK" >&2
  tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
  SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
  # shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
  cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    $CMAKE_ARGS >&2
  cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$CACHE"
  cp "$WORK/build/bin/llama-server" "$BINARY.tmp" && mv "$BINARY.tmp" "$BINARY"
fi
echo "$BINARY"
