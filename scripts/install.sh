#!/usr/bin/env bash
# Creates the virtualenv, builds llama.cpp (through llama-cpp-python) for this CPU, and installs
# multiserve into it. Safe to run again: finished steps are skipped.
#
# Why a build of our own: the default native llama.cpp build was seen to segfault in llama_decode on
# AVX-512/AMX Xeons, and pip reuses a cached source build whatever CMAKE_ARGS say. So the flags are
# chosen per architecture here and the wheel is cached under a key made from those flags.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${MULTISERVE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${MULTISERVE_EXTRAS:-test}

# shellcheck source=scripts/llama-cpp-build.sh
source scripts/llama-cpp-build.sh

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

CMAKE_ARGS=$(cmake_args_for_this_cpu)
PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
KEY=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" "$(uname -m)" "$PYVER" | sha256sum | cut -c1-16)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/multiserve/wheels/$KEY"
STAMP="$VENV/.multiserve-install"
WANT="$KEY $(cat pyproject.toml src/multiserve/engine/*.c | sha256sum | cut -c1-16) $EXTRAS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "Building llama.cpp for $(uname -m) with: $CMAKE_ARGS (a few minutes, once)"
  mkdir -p "$WHEELS"
  CMAKE_ARGS="$CMAKE_ARGS" "${PIP[@]}" wheel --no-cache-dir --no-deps \
    "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS.tmp"
  mv "$WHEELS.tmp"/llama_cpp_python-*.whl "$WHEELS"/ && rm -rf "$WHEELS.tmp"
fi
"${PIP[@]}" install --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
"${PIP[@]}" install -e ".[$EXTRAS]"
echo "$WANT" > "$STAMP"
