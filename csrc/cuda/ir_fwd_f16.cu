// Explicit instantiations of the fused inverted-residual kernel (ir_kernels.cuh): fp16, bf16.
#include "ir_kernels.cuh"

EFFK_INSTANTIATE_IR(__half)
EFFK_INSTANTIATE_IR(__nv_bfloat16)
