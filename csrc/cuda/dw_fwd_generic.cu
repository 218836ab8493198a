// Explicit instantiations of the depthwise forward kernels (dw_kernels.cuh), split over
// several files so that the build compiles them in parallel.
#include "dw_kernels.cuh"

// Any k in 1..11 and any dilation (fp32 accumulation for fp32/fp16/bf16; fp64).
EFFK_INSTANTIATE_DW_FWD(float, effkernels::cuda::kStaged, 1)
EFFK_INSTANTIATE_DW_FWD(float, effkernels::cuda::kStaged, 2)
EFFK_INSTANTIATE_DW_FWD(double, effkernels::cuda::kStaged, 1)
EFFK_INSTANTIATE_DW_FWD(double, effkernels::cuda::kStaged, 2)
