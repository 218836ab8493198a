"""Loads the compiled library (effkernels._C) once and remembers why it is missing, if it is."""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_C = None
load_error: str | None = None

try:
    _C = importlib.import_module("effkernels._C")
except Exception as exc:  # ImportError, or an OSError from a broken/mismatched build
    load_error = (
        f"effkernels._C could not be loaded ({type(exc).__name__}: {exc}); build it with "
        "`pip install --no-build-isolation -e .` (or `make test`)"
    )


def loaded() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return bool(_C is not None and getattr(_C, "with_cuda", 0))


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels run on in this process: "amx" (AVX-512 with AMX-BF16
    tiles for bf16 GEMMs), "avx512bf16" (AVX-512 with vdpbf16ps for bf16 GEMMs), "avx512",
    "avx2" or "base" (SSE2); EFFK_CPU_ISA caps it. None when the extension is missing."""
    return _C.cpu_isa() if _C is not None else None
