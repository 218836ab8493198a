// Explicit instantiations of the pointwise conv GEMM (pw_kernels.cuh): fp32 and fp64 (FFMA
// tiles). One storage dtype family per file, so that the build compiles them in parallel.
#include "pw_kernels.cuh"

EFFK_INSTANTIATE_PW(float)
EFFK_INSTANTIATE_PW(double)
