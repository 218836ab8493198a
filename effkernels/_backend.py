"""Backend selection: which implementation serves an op for a given tensor.

Names: "auto", "cpu" (C++ CPU kernels), "cuda" (C++ CUDA kernels), "triton", "reference".
"auto" picks, per call, for CPU tensors: cpu, else reference; for CUDA tensors: cuda (see
below), else triton, else reference. A backend named explicitly that cannot serve the tensor
raises; it never falls back silently.

The C++ CUDA kernels (csrc/cuda) exist for some ops only (dwconv_bn_act, mixconv_bn_act,
pwconv_bn_act, and so inverted_residual, which composes them for training and has a fused
eval-mode kernel, inverted_residual_inference; `cuda_ops()` reads which from the dispatcher: an
op is listed when its forward and backward both have a CUDA kernel registered),
and the availability of the "cuda" backend is judged per op: an explicit
"cuda" refuses an op without CUDA kernels, with that reason, and "auto" passes such ops on to
triton. Those kernels are compiled and ptxas-checked on GPU-less build machines, and their
per-element math is shared with the CPU kernels (csrc/include/effkernels). Their first GPU runs
(an H200, 2026-11-30; bench/NOTES.md) passed 580 of the 581 `cuda`-marked tests outside the
Triton backend's and found them no faster than the Triton kernels on the eval forwards and
slower on the fused block, so "auto" does NOT choose them, but for the ops of CUDA_FIRST_OPS
(mixconv_bn_act: faster than Triton's forward and backward, see below); for every op when the
environment variable EFFK_CUDA_KERNELS=1 is set (read at each call). `set_backend("cuda")` /
`backend("cuda")` always uses them where they exist.

Eval-mode blocks (inverted_residual, training=False, no gradient recorded) on CUDA tensors run
as the backend's own per-op kernels composed (pwconv_bn_act -> dwconv_bn_act -> [SE] ->
pwconv_bn_act with the residual fused), on both the cuda and the triton backend, not as its
fused block kernel: on an H200 (`python -m bench.gpu_targets`, fp16 channels_last N=64, the
C24 t6 k3 56x56 block with skip, 2026-12-01) the cuda ops composed took 0.322 ms against
1.450 ms for the fused CUDA kernel, the triton ops 0.245 ms against 0.809 ms for the fused
Triton block (eager PyTorch channels_last: 0.330 ms). EFFK_FUSED_BLOCK=1 (read at each call)
selects the fused kernels again. CPU tensors keep their fused blocks (the CPU kernel, and the
Triton block in the interpreter).
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


def _has_op_kernels(op: str, dispatch_key: str) -> bool:
    """The forward and backward ops of `op` both have a kernel for `dispatch_key`."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"effkernels::{name}",
                                                               dispatch_key)
               for name in (op, f"{op}_backward"))


def _has_kernels(dispatch_key: str) -> bool:
    return all(_has_op_kernels(op, dispatch_key) for op in _OPS)


def cuda_ops() -> tuple:
    """The ops whose C++ CUDA kernels this build has (inverted_residual composes the others
    and so needs all three)."""
    if not _extension.loaded():
        return ()
    ops = tuple(op for op in _OPS if _has_op_kernels(op, "CUDA"))
    return ops + (("inverted_residual",) if len(ops) == len(_OPS) else ())


_FUSED_INFERENCE: Dict[str, bool] = {}


@torch.compiler.assume_constant_result  # a property of the build, constant in a graph
def fused_inference(device_type: str) -> bool:
    """Whether effkernels::inverted_residual_inference (the fused eval-mode block, BatchNorm
    folded: csrc/cpu/inverted_residual.cpp, csrc/cuda/inverted_residual.cu) has a kernel for
    `device_type` tensors in this build. Cached: the dispatcher query costs ~10 us, and the
    kernels are registered once, when the extension loads."""
    if device_type not in _FUSED_INFERENCE:
        found = _extension.loaded() and hasattr(torch.ops.effkernels,
                                                "inverted_residual_inference")
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _FUSED_INFERENCE[device_type] = bool(
            found and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
                "effkernels::inverted_residual_inference", key))
    return _FUSED_INFERENCE[device_type]


@torch.compiler.assume_constant_result  # no environment read inside a compiled graph
def cuda_auto_enabled() -> bool:
    """Whether "auto" may pick the C++ CUDA kernels (EFFK_CUDA_KERNELS=1; see the docstring)."""
    return os.environ.get("EFFK_CUDA_KERNELS") == "1"


@torch.compiler.assume_constant_result  # no environment read inside a compiled graph
def fused_block_enabled() -> bool:
    """Whether eval-mode blocks on CUDA tensors take the backend's fused block kernel rather
    than its ops composed (EFFK_FUSED_BLOCK=1; see the docstring)."""
    return os.environ.get("EFFK_FUSED_BLOCK") == "1"


@torch.compiler.assume_constant_result  # torch.compile evaluates it once, as a constant
def _why_not(name: str, device_type: str, op: Optional[str] = None) -> Optional[str]:
    """None if backend `name` can run `op` (any op when None) on `device_type` tensors, else
    the reason it cannot."""
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
        have = cuda_ops()
        if not have:
            return "the CUDA kernels are not part of this build yet"
        if op is not None and op not in have:
            return (f"the CUDA kernels of {op} are not part of this build yet (CUDA kernels: "
                    f"{', '.join(have)})")
        if op is None and len(have) < len(_OPS) + 1:
            missing = [o for o in (*_OPS, "inverted_residual") if o not in have]
            return (f"CUDA kernels for {', '.join(have)} only (not yet: {', '.join(missing)}); "
                    "ask available_backends(device, op) per op")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        from . import _triton_backend

        return _triton_backend.why_not(device_type)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")


_why_cache: Dict[tuple, Optional[str]] = {}


def _why_not_cached(name: str, device_type: str, op: Optional[str] = None) -> Optional[str]:
    """_why_not, memoised for eager calls (it is asked on every op call and does not change
    within a process); torch.compile evaluates _why_not itself as a constant."""
    if torch.compiler.is_compiling():
        return _why_not(name, device_type, op)
    key = (name, device_type, op)
    if key not in _why_cache:
        _why_cache[key] = _why_not(name, device_type, op)
    return _why_cache[key]


def available_backends(device: Union[str, torch.device, None] = None,
                       op: Optional[str] = None) -> Dict[str, str]:
    """For `device` (default cpu): {backend: "available" or the reason it is not}; with `op`
    (e.g. "dwconv_bn_act"), for that op (the cuda backend has kernels for some ops only)."""
    device_type = torch.device(device or "cpu").type
    return {name: (_why_not(name, device_type, op) or "available") for name in NAMES[1:]}


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


# The ops whose C++ CUDA kernels "auto" takes without EFFK_CUDA_KERNELS=1: GPU-verified (every
# `cuda`-marked test passes) and faster than the Triton kernels forward and backward on an H200
# (`python -m bench.gpu_targets`, fp16 N=64, 2026-12-01: mixconv C192 28x28 k3-9 eval forward
# 0.135 vs 0.223 ms, backward 0.520 vs 1.519 ms).
CUDA_FIRST_OPS = ("mixconv_bn_act",)


def auto_order(device_type: str, op: Optional[str] = None) -> tuple:
    """The backends "auto" tries, in order, for `op`'s tensors of `device_type`."""
    if device_type == "cpu":
        return ("cpu",)
    if cuda_auto_enabled() or op in CUDA_FIRST_OPS:
        return ("cuda", "triton")
    return ("triton",)


def resolve(x: torch.Tensor, op: Optional[str] = None) -> str:
    """The backend that serves `op` (None: any op) whose input is `x`; raises if the selection
    cannot."""
    # (Eager, x.is_cpu first: it builds no torch.device, ~25 us of a batch-1 forward's checks
    # right after its kernels have streamed the weights through the caches.)
    device_type = ("cpu" if not torch.compiler.is_compiling() and x.is_cpu
                   else x.device.type)
    if device_type == "meta":  # shape propagation: the C++ ops' fake kernels serve it
        return "cpu" if _extension.loaded() else "reference"
    if _current != "auto":
        why = _why_not_cached(_current, device_type, op)
        if why is not None:
            raise RuntimeError(f"effkernels backend {_current!r} cannot run this input: {why}")
        return _current
    for name in auto_order(device_type, op):
        if _why_not_cached(name, device_type, op) is None:
            return name
    return "reference"


def _env_default() -> None:
    name = os.environ.get("EFFK_BACKEND")
    if name:
        set_backend(name)


_env_default()
