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
