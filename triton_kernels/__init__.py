"""Triton kernels of effkernels, installed as `effkernels.triton_kernels` (never as a top-level
`triton_kernels`, a name other packages own). One file per op; none has landed yet."""

OPS_READY = False
