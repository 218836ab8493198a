// Explicit instantiations of the fused inverted-residual kernel (ir_kernels.cuh): fp32, fp64.
#include "ir_kernels.cuh"

EFFK_INSTANTIATE_IR(float)
EFFK_INSTANTIATE_IR(double)
