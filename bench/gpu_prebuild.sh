#!/usr/bin/env bash
# Builds the extension on this (GPU-less) machine for the GPU machine's torch and Python, so
# that bench/gpu_check.sh spends none of the device lease on the build:
#   bench/gpu_prebuild.sh PYTHON
# PYTHON: a Python of the GPU machine's version with its torch installed (there: Python 3.12,
# torch 2.11.0+cu130; e.g. a venv of pyenv's 3.12 with that wheel). Writes the stripped
# library and the sha256 of csrc/ into .prebuilt/ (git ignores it; name it in the device tool's
# `carry`); gpu_check.sh uses it only while the sources match and it loads there.
set -euo pipefail
PY=${1:?usage: bench/gpu_prebuild.sh PYTHON}
cd "$(dirname "$0")/.."
sha=$(bash bench/gpu_sources_sha.sh)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} EFFK_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace
suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
mkdir -p .prebuilt
rm -f .prebuilt/_C.*.so .prebuilt/SOURCES.sha256
# The debug info (-g from Python's flags) is most of the file; the device tool carries 64 MiB.
strip --strip-debug -o ".prebuilt/_C$suffix" "effkernels/_C$suffix"
echo "$sha" > .prebuilt/SOURCES.sha256
ls -la .prebuilt
