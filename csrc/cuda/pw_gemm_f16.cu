// Explicit instantiations of the pointwise conv GEMM (pw_kernels.cuh): fp16 (tensor cores).
#include "pw_kernels.cuh"

EFFK_INSTANTIATE_PW(__half)
