// Explicit instantiations of the depthwise forward kernels (dw_kernels.cuh), split over
// several files so that the build compiles them in parallel.
#include "dw_kernels.cuh"

EFFK_INSTANTIATE_DW_FWD(float, 3, 1)
EFFK_INSTANTIATE_DW_FWD(float, 3, 2)
EFFK_INSTANTIATE_DW_FWD(float, 5, 1)
EFFK_INSTANTIATE_DW_FWD(float, 5, 2)
