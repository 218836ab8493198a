// Explicit instantiations: mixconv's one-launch kernel (per-channel-block kernel size, each
// block branching to the unrolled body of its k); see dw_kernels.cuh.
#include "dw_kernels.cuh"

EFFK_INSTANTIATE_DW_FWD(float, effkernels::cuda::kMixed, 1)
EFFK_INSTANTIATE_DW_FWD(float, effkernels::cuda::kMixed, 2)
