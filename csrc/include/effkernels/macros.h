// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EFFK_HOST_DEVICE __host__ __device__
#define EFFK_INLINE __forceinline__
#else
#define EFFK_HOST_DEVICE
#define EFFK_INLINE inline __attribute__((always_inline))
#endif

#define EFFK_HD EFFK_HOST_DEVICE EFFK_INLINE
