#!/usr/bin/env bash
# The one prepared GPU check (run it on the lent GPU machine, from the repository root):
#   bench/gpu_check.sh OUTDIR
# builds the extension there (its own torch/nvcc), runs the cuda-marked tests, the Triton tests
# compiled for the GPU, the CPU suite against that torch, then the GPU benchmarks. Logs and
# the CSV land in OUTDIR. Exit status: non-zero if the build or any test failed.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} EFFK_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0
step() { echo "== $1 ($(date +%T))"; }

step env
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  "$PY" -m pip list 2>/dev/null | grep -iE "pytest|xdist|timm|hypothesis|numpy"; } 2>&1 | tee "$OUT/env.log"

step build
t0=$(date +%s)
{ EFFK_NO_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
  "$PY" setup.py build_ext --inplace; } > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"; grep -E "effkernels build settings" -A7 "$OUT/build.log"
if [ $rc -ne 0 ]; then tail -n 60 "$OUT/build.log"; exit 1; fi
"$PY" -c "import effkernels; print(effkernels.available_backends('cuda'))"

xdist=""; "$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"

step "GPU tests (cuda marker)"
"$PY" -m pytest tests -m cuda -q -rs --ignore=tests/triton -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests_cuda.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "Triton tests, compiled for the GPU"
"$PY" -m pytest tests/triton -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests_triton.log" \
  | tail -n 8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "CPU suite against this machine's torch"
timeout 240 "$PY" -m pytest tests -m "not cuda" -q -x $xdist --ignore=tests/triton \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests_cpu.log" | tail -n 8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "GPU benchmarks"
# --quick: the full run (every layer shape, four models, torch.compile baselines) takes far
# longer than this step's share of the device time.
timeout 150 "$PY" -m bench.run --device cuda --targets --dtype float16 2>&1 \
  | tee "$OUT/bench.log" | tail -n 30
timeout 90 "$PY" -m bench.run --device cuda --quick --suite ops 2>&1 \
  | tee "$OUT/bench_quick.log" | tail -n 20
cp bench/results/cuda-*.csv "$OUT/" 2>/dev/null || true

step "done: status $status"
exit $status
