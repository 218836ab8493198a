// Explicit instantiations of the direct depthwise forward kernel (dw_direct.cuh), stride 1.
#include "dw_direct.cuh"

EFFK_INSTANTIATE_DW_FWD_DIRECT_ALL(1)
