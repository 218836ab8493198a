"""The Triton backend's availability. Its kernels (triton_kernels/, installed as
effkernels.triton_kernels) arrive with the Triton-backend issue; until then it says so."""
from __future__ import annotations

from typing import Optional


def why_not(device_type: str) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed ({type(exc).__name__}: {exc})"
    try:
        from . import triton_kernels
    except Exception as exc:
        return f"effkernels.triton_kernels could not be imported ({type(exc).__name__}: {exc})"
    if not getattr(triton_kernels, "OPS_READY", False):
        return "the Triton kernels are not implemented yet"
    return None
