"""Backend selection: which implementation serves an op for a given tensor.

Names: "auto", "cpu" (C++ CPU kernels), "cuda" (C++ CUDA kernels), "triton", "reference".
"auto" picks, per call, for CPU tensors: cpu, else reference; for CUDA tensors: cuda, else
triton, else reference. A backend named explicitly that cannot serve the tensor raises; it
never falls back silently.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Union

import torch

from . import _extension

NAMES = ("auto", "cpu", "cuda", "triton", "reference")
_OPS = ("dwconv_bn_act", "pwconv_bn_act", "mixconv_bn_act")

_current = "auto"


def _has_kernels(dispatch_key: str) -> bool:
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels::{op}", dispatch_key)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels::{op}_backward",
                                                            dispatch_key)
        for op in _OPS
    )


@torch.compiler.assume_constant_result  # torch.compile evaluates it once, as a constant
def _why_not(name: str, device_type: str) -> Optional[str]:
    """None if backend `name` can run tensors on `device_type`, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors only (got a {device_type} tensor)"
        if not _extension.loaded():
            return _extension.load_error
        return None if _has_kernels("CPU") else "effkernels._C has no CPU kernels registered"
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors only (got a {device_type} tensor)"
        if not _extension.loaded():
            return _extension.load_error
        if not _extension.built_with_cuda():
            return ("effkernels._C was built without CUDA (CPU-only torch, no CUDA toolkit, or "
                    "EFFK_BUILD_CUDA=0)")
        if not _has_kernels("CUDA"):
            return "the CUDA kernels are not part of this build yet"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        from . import _triton_backend

        return _triton_backend.why_not(device_type)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")


_why_cache: Dict[tuple, Optional[str]] = {}


def _why_not_cached(name: str, device_type: str) -> Optional[str]:
    """_why_not, memoised for eager calls (it is asked on every op call and does not change
    within a process); torch.compile evaluates _why_not itself as a constant."""
    if torch.compiler.is_compiling():
        return _why_not(name, device_type)
    key = (name, device_type)
    if key not in _why_cache:
        _why_cache[key] = _why_not(name, device_type)
    return _why_cache[key]


def available_backends(device: Union[str, torch.device, None] = None) -> Dict[str, str]:
    """For `device` (default cpu): {backend: "available" or the reason it is not}."""
    device_type = torch.device(device or "cpu").type
    return {name: (_why_not(name, device_type) or "available") for name in NAMES[1:]}


def get_backend() -> str:
    return _current


def set_backend(name: str) -> None:
    """Selects the backend for all following calls ("auto" restores the default choice)."""
    global _current
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    _current = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with effkernels.backend("reference"): ...` runs the block on that backend."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(x: torch.Tensor) -> str:
    """The backend that serves an op whose input is `x`; raises if the selection cannot."""
    device_type = x.device.type
    if device_type == "meta":  # shape propagation: the C++ ops' fake kernels serve it
        return "cpu" if _extension.loaded() else "reference"
    if _current != "auto":
        why = _why_not_cached(_current, device_type)
        if why is not None:
            raise RuntimeError(f"effkernels backend {_current!r} cannot run this input: {why}")
        return _current
    order = ("cpu",) if device_type == "cpu" else ("cuda", "triton")
    for name in order:
        if _why_not_cached(name, device_type) is None:
            return name
    return "reference"


def _env_default() -> None:
    name = os.environ.get("EFFK_BACKEND")
    if name:
        set_backend(name)


_env_default()
