#!/usr/bin/env bash
# Configures, builds and runs the CMake library and its ctest target against the venv's torch.
# Usage: tests/cpp/run_ctest.sh [python]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
# A CUDA build of torch makes find_package(Torch) look for the toolkit even for a CPU-only
# library: point it at nvcc and at the pip wheel's nvrtc (see shared/MACHINE-NOTES.md).
if "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  nvrtc=$(ls "$site"/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | head -n1 || true)
  args+=(-DCMAKE_CUDA_COMPILER="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
         -DCUDA_TOOLKIT_ROOT_DIR="${CUDA_HOME:-/usr/local/cuda}")
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
fi
cmake -S . -B cmake-build "${args[@]}" > cmake-build.log 2>&1 || { cat cmake-build.log; exit 1; }
cmake --build cmake-build -j "${MAX_JOBS:-2}" 2>&1 | tail -n 3
ctest --test-dir cmake-build --output-on-failure
