// Explicit instantiations of the pointwise conv GEMM (pw_kernels.cuh): bf16 (tensor cores).
#include "pw_kernels.cuh"

EFFK_INSTANTIATE_PW(__nv_bfloat16)
