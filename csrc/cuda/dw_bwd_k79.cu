// Explicit instantiations of the depthwise grad-input kernels (dw_kernels.cuh), split over
// several files so that the build compiles them in parallel.
#include "dw_kernels.cuh"

EFFK_INSTANTIATE_DW_BWD(float, 7, 1)
EFFK_INSTANTIATE_DW_BWD(float, 7, 2)
EFFK_INSTANTIATE_DW_BWD(float, 9, 1)
EFFK_INSTANTIATE_DW_BWD(float, 9, 2)
