# What every llama.cpp build of this project shares: the llama-cpp-python release (whose vendored
# llama.cpp we run) and the CMake flags for this CPU. Sourced by the wheel build (install.sh) and by
# the llama-server anchor of the benchmarks (build-llama-server.sh), so both run the same kernels.

LLAMA_VERSION=0.3.36

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
