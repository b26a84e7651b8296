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
LLAMA_VERSION=0.3.36
EXTRAS=${MULTISERVE_EXTRAS:-test}

cmake_args_for_this_cpu() {
  if [ -n "${MULTISERVE_CMAKE_ARGS:-}" ]; then
    echo "$MULTISERVE_CMAKE_ARGS"
    return
  fi
  case "$(uname -m)" in
    x86_64|amd64)
      # Never GGML_NATIVE here: the native build segfaulted in llama_decode on Gemma 3 on an
      # AVX-512 + AMX Xeon. CPUs with AMX get the portable AVX2 build, which runs it. AVX-512
      # CPUs without AMX (e.g. AMD EPYC Zen 4) get AVX-512 kernels: measured here 15-35% more
      # tokens/s than AVX2 on Gemma 3 270M, and covered by the real-model test.
      local flags
      flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
      has() { [[ " $flags " == *" $1 "* ]]; }
      if has avx512f && has avx512bw && has avx512vl && ! has amx_tile; then
        local args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        args+=" -DGGML_AVX512=ON"
        has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"
        has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
        has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
        echo "$args"
      elif has avx2; then
        echo "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
      else
        echo "-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"
      fi ;;
    aarch64|arm64)
      # Native build keeps NEON, dot-product, i8mm and SVE kernels of this Neoverse core;
      # KleidiAI adds Arm's optimised micro-kernels for quantised matmuls.
      echo "-DGGML_NATIVE=ON -DGGML_CPU_KLEIDIAI=ON" ;;
    *)
      echo "-DGGML_NATIVE=ON" ;;
  esac
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

CMAKE_ARGS=$(cmake_args_for_this_cpu)
PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
KEY=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" "$(uname -m)" "$PYVER" | sha256sum | cut -c1-16)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/multiserve/wheels/$KEY"
STAMP="$VENV/.multiserve-install"
WANT="$KEY $(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"

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
