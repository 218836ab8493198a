// Explicit instantiations of the depthwise forward kernels (dw_kernels.cuh), split over
// several files so that the build compiles them in parallel.
#include "dw_kernels.cuh"

EFFK_INSTANTIATE_DW_FWD(float, 7, 1)
EFFK_INSTANTIATE_DW_FWD(float, 7, 2)
EFFK_INSTANTIATE_DW_FWD(float, 9, 1)
EFFK_INSTANTIATE_DW_FWD(float, 9, 2)
