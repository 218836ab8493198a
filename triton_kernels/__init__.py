"""Triton kernels of effkernels, installed as `effkernels.triton_kernels` (never as a top-level
`triton_kernels`, a name other packages own). One file per op: its @triton.jit kernels and the
host launchers `forward(...)` / `backward(...)` with the signatures of the C++ ops
(csrc/ops.cpp); effkernels/_triton_ops.py registers them as the `effkernels_triton` ops.
Shared pieces: activation.py (epilogue activations), batchnorm.py (per-channel BN arithmetic),
host.py (the launchers' device guard, input views and output format).
"""
