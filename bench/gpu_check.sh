#!/usr/bin/env bash
# The one prepared GPU check (run it on the lent GPU machine, from the repository root):
#   bench/gpu_check.sh OUTDIR
# 1. the extension: a prebuilt one when it matches the sources (see below), else built there
#    (its own torch/nvcc, sm_90);
# 2. the cuda-marked tests of the CUDA kernels and the reference (every op, forward and
#    backward, every dtype, against the float64 reference; gradcheck; opcheck);
# 3. bench.gpu_targets (issue 4's targets: copy bandwidth, dweight vs native/cuDNN, pointwise
#    vs cuBLAS, the CUDA kernels vs the Triton kernels and eager's backward, the block fused and
#    composed, its training step), Nsight Compute over bench.gpu_profile, and bench.run
#    --targets (ours vs eager and torch.compile);
# 4. the Triton backend's tests, compiled for the GPU;
# 5. (when GPU_CHECK_CPU=1) the CPU suite against that machine's torch.
# GPU_CHECK_TRITON_LIMIT: seconds for each of step 4's two suites (default 80; quick: 40).
# Every step has its own time limit, so that the whole stays inside a device lease (about 8
# minutes with the prebuilt extension; GPU_CHECK_QUICK=1: about 3). The CSVs land in OUTDIR, the
# logs packed into OUTDIR/logs.tgz at the end (the device tool returns 8 files at most; a run cut
# short leaves them unpacked), with Triton's compile cache as OUTDIR/triton_cache.tgz: copied
# into .prebuilt/, the next run starts from it. Exit status: non-zero if the build or any test
# failed.
#
# Prebuilt extension: building there takes minutes of the lease. `make gpu-prebuild`
# (bench/gpu_prebuild.sh) builds the extension here against the GPU machine's torch and Python
# (2.11 / 3.12) into .prebuilt/ with the sha256 of the sources; name .prebuilt in the device
# tool's `carry`.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} EFFK_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0
step() { echo "== $1 ($(date +%T))"; }
# pytest-xdist and pytest-timeout are in the GPU machine's image; run without them elsewhere.
xdist=""; "$PY" -c "import xdist" 2>/dev/null && xdist="-n ${GPU_CHECK_WORKERS:-14}"
tmo=""; "$PY" -c "import pytest_timeout" 2>/dev/null && tmo="--timeout=120 --timeout-method=thread"

step env
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  nproc; } 2>&1 | tee "$OUT/setup.log"

step extension
t0=$(date +%s)
# No install: the GPU machine has no network, and its pip turns `pip install -e .` into
# `setup.py develop`, which asks the network for build dependencies. The tests import the
# package from the source tree; effkernels.triton_kernels (installed from triton_kernels/)
# is linked in place.
[ -e effkernels/triton_kernels ] || ln -s ../triton_kernels effkernels/triton_kernels
# Triton's compile cache from an earlier GPU run (its triton_cache.tgz, copied into .prebuilt/):
# the kernels whose source and specialisation did not change are not compiled again.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -f .prebuilt/triton_cache.tgz ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar xzf .prebuilt/triton_cache.tgz -C "$TRITON_CACHE_DIR" \
    && echo "Triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) entries from .prebuilt/"
fi
loaded() { "$PY" -c "
import effkernels
from effkernels import _backend, _extension
assert _extension.loaded(), _extension.load_error
print('CUDA kernels for', _backend.cuda_ops())
assert _backend.cuda_ops(), 'no CUDA kernels registered'" >> "$OUT/setup.log" 2>&1; }
ready=0
prebuilt=$(ls .prebuilt/_C.*.so 2>/dev/null | head -n 1)
if [ -n "$prebuilt" ] && [ "$(cat .prebuilt/SOURCES.sha256 2>/dev/null)" = "$(bash bench/gpu_sources_sha.sh)" ]; then
  if cp "$prebuilt" effkernels/ && loaded; then
    ready=1; echo "prebuilt extension $(basename "$prebuilt") loads"
  else
    echo "prebuilt extension does not load here: building"; rm -f effkernels/_C.*.so
  fi
else
  echo "no prebuilt extension for these sources: building"
fi
if [ $ready = 0 ]; then
  "$PY" setup.py build_ext --inplace >> "$OUT/setup.log" 2>&1
  rc=$?
  grep -E "effkernels build settings" -A7 "$OUT/setup.log"
  if [ $rc -ne 0 ] || ! loaded; then tail -n 60 "$OUT/setup.log"; exit 1; fi
fi
echo "extension ready in $(( $(date +%s) - t0 )) s"
"$PY" -c "import effkernels; print(effkernels.available_backends('cuda'))" | tee -a "$OUT/setup.log"

summary() { grep -E "^(FAILED|ERROR)|crashed|passed|failed|skipped in|Timeout" "$1" | tail -n "$2"; }

step "GPU tests of the CUDA kernels and the reference (cuda marker, not triton)"
timeout 150 "$PY" -m pytest tests -m cuda -k "not triton" -q -rfEs --tb=short $xdist $tmo \
  --ignore=tests/triton -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1
[ $? -eq 0 ] || status=1
summary "$OUT/tests_cuda.log" 40

step "GPU targets (bench.gpu_targets)"
timeout 150 "$PY" -m bench.gpu_targets --dtype float16 --csv "$OUT/gpu_targets.csv" \
  > "$OUT/gpu_targets.log" 2>&1
tail -n 32 "$OUT/gpu_targets.log"  # the summary (the rows: gpu_targets.csv)

quick=${GPU_CHECK_QUICK:-0}  # 1: no Nsight Compute, no bench.run, a shorter Triton step
step "Nsight Compute: the target cases' kernels (bench.gpu_profile)"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ "$quick" = 1 ]; then
  echo "skipped (GPU_CHECK_QUICK=1)"
elif [ -n "$NCU" ]; then
  timeout 100 "$NCU" --clock-control none --profile-from-start off --nvtx \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    "$PY" -m bench.gpu_profile > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$? ($(grep -c 'Section: GPU Speed Of Light' "$OUT/ncu.txt") kernels profiled)"
else
  echo "ncu not found"
fi

step "GPU benchmarks (bench.run --targets)"
if [ "$quick" = 1 ]; then
  echo "skipped (GPU_CHECK_QUICK=1)"
else
  timeout 90 "$PY" -m bench.run --device cuda --targets --dtype float16 > "$OUT/bench.log" 2>&1
  tail -n 16 "$OUT/bench.log"
  cp bench/results/cuda-2*.csv "$OUT/" 2>/dev/null || true
fi

# The Triton backend last: each test compiles its kernels' specialisations on a fresh machine
# (seconds each; more for the block's), so the step is long. -v names every result as it comes,
# so that a step cut by its time limit still says what passed and what was still running.
step "Triton backend on the GPU (tests -m cuda -k triton, then tests/triton)"
limit=${GPU_CHECK_TRITON_LIMIT:-$([ "$quick" = 1 ] && echo 40 || echo 80)}  # seconds per suite
# One pwconv config per problem: the autotuner would time every config for each test shape
# (about 1 s per new shape by do_bench's defaults, not measured); tests/triton's
# test_every_config still checks each config.
export EFFK_TRITON_AUTOTUNE=0
# A step cut by its limit leaves -v's last line unfinished: the rc line gets a line of its own.
{ timeout $limit "$PY" -m pytest tests -m cuda -k triton --ignore=tests/triton -v -rfE \
    --tb=short --durations=25 $xdist $tmo -p no:cacheprovider || printf '\nrc=%s\n' $?
  timeout $limit "$PY" -m pytest tests/triton -v -rfE --tb=short --durations=25 $xdist $tmo \
    -p no:cacheprovider || printf '\nrc=%s\n' $?; } > "$OUT/tests_triton.log" 2>&1
grep -q "^rc=" "$OUT/tests_triton.log" && status=1
summary "$OUT/tests_triton.log" 20

if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  step "CPU suite against this machine's torch"
  timeout 150 "$PY" -m pytest tests -m "not cuda and not slow" -q -x -n 16 --ignore=tests/triton \
    -p no:cacheprovider > "$OUT/tests_cpu.log" 2>&1
  [ $? -eq 0 ] || status=1
  tail -n 5 "$OUT/tests_cpu.log"
fi

step "pack: logs and Triton's cache (8 files at most come back from the device tool)"
( cd "$OUT" && shopt -s nullglob && logs=(*.log *.txt) && [ ${#logs[@]} -gt 0 ] \
    && tar czf logs.tgz "${logs[@]}" && rm -f "${logs[@]}" )
if [ -d "$TRITON_CACHE_DIR" ]; then
  # A cache hit reads the metadata (.json), the cubin and the launcher (.so) only: the
  # intermediate IRs and the source are two thirds of the bytes.
  tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" --exclude='*.ptx' --exclude='*.ttir' \
    --exclude='*.ttgir' --exclude='*.llir' --exclude='*.source' .
  size=$(stat -c %s "$OUT/triton_cache.tgz")
  # The device tool returns files up to 16 MiB.
  [ "$size" -lt $((16 * 1024 * 1024)) ] || { echo "Triton cache too large ($size B)"; rm -f "$OUT/triton_cache.tgz"; }
fi
ls -la "$OUT"

step "done: status $status"
exit $status
