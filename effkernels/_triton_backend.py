"""The Triton backend: whether it can run here, and its ops (effkernels/_triton_ops.py).

It runs CUDA tensors on a GPU, and CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported), which is how CI verifies the kernels without a GPU."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

_ops = None
_import_error: Optional[str] = None


def _load() -> Optional[str]:
    """Imports the Triton ops once; returns why they cannot be used, or None."""
    global _ops, _import_error
    if _ops is None and _import_error is None:
        try:
            import triton  # noqa: F401
        except Exception as exc:
            # Not installed, or installed but broken (a missing part, a mismatched build).
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "triton"
            _import_error = (f"triton {'is not installed' if missing else 'could not be imported'}"
                             f" ({type(exc).__name__}: {exc})")
            return _import_error
        try:
            import torch

            from . import _triton_ops  # noqa: F401  (registers the effkernels_triton ops)

            _ops = torch.ops.effkernels_triton
        except Exception as exc:
            _import_error = (f"the Triton ops could not be loaded ({type(exc).__name__}: "
                             f"{exc})")
    return _import_error


def _missing() -> Optional[str]:
    """Why triton is not installed (found without importing it), or None."""
    try:
        if importlib.util.find_spec("triton") is not None:
            return None
        return "triton is not installed (pip install triton)"
    except (ImportError, ValueError) as exc:
        return f"triton is not installed ({type(exc).__name__}: {exc})"


def why_not(device_type: str) -> Optional[str]:
    # A missing triton is named first, whatever the device: the other reasons below would hide
    # it on a machine without a GPU.
    missing = _missing()
    if missing is not None:
        return missing
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton backend runs CUDA tensors (and CPU tensors only in Triton's "
                "interpreter, TRITON_INTERPRET=1)")
    if device_type not in ("cpu", "cuda"):
        return f"the triton backend cannot run {device_type} tensors"
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return _load()


def ops():
    why = _load()
    if why is not None:
        raise RuntimeError(f"effkernels triton backend: {why}")
    return _ops
