"""The CUDA kernels of issue 4's target cases, once each, for Nsight Compute (bench/gpu_check.sh):

  ncu --profile-from-start off --nvtx --section SpeedOfLight ... python -m bench.gpu_profile

Each case is warmed up first (allocations, weight packing, Triton compiles); only the one
call inside the profiler range, tagged with an NVTX range of the case's name, is profiled.
fp16, channels_last, issue 4's shapes (N=64).
"""
from __future__ import annotations

import sys

import torch

from .gpu_targets import _bn, _env

CL = torch.channels_last


def cases(dev="cuda", dt=torch.float16):
    import effkernels
    import effkernels.nn

    ops = torch.ops.effkernels
    n, c, h = 64, 144, 56
    x = torch.randn(n, c, h, h, device=dev, dtype=dt).contiguous(memory_format=CL)
    w = (torch.randn(c, 1, 3, 3, device=dev) / 3).to(dt)
    g, b, rm, rv = _bn(c, dev)
    go = torch.randn_like(x)
    xp = torch.randn(n, 24, h, h, device=dev, dtype=dt).contiguous(memory_format=CL)
    wp = (torch.randn(c, 24, 1, 1, device=dev) / 5).to(dt)
    block = effkernels.nn.InvertedResidual(24, 24, 1, 6, act="relu6").to(dev, dt).eval()
    block = block.to(memory_format=CL)

    def block_fwd():  # the cuda ops composed (EFFK_FUSED_BLOCK unset)
        with torch.no_grad(), effkernels.backend("cuda"):
            return block(xp)

    def dw_fwd_eval_tiled():  # the tiled kernel the direct one replaced (read per call)
        with _env("EFFK_DW_DIRECT", "0"):
            return ops.dwconv_bn_act(x, w, g, b, rm, rv, 1, 1, 1, "relu6", False, 1e-5)

    return {
        "dw_fwd_eval": lambda: ops.dwconv_bn_act(x, w, g, b, rm, rv, 1, 1, 1, "relu6", False,
                                                 1e-5),
        "dw_fwd_eval_tiled": dw_fwd_eval_tiled,
        "dw_bwd": lambda: ops.dwconv_bn_act_backward(go, x, w, g, b, rm, rv, 1, 1, 1, "relu6",
                                                     True, 1e-5),
        "pw_fwd_eval": lambda: ops.pwconv_bn_act(xp, wp, g, b, rm, rv, None, "relu6", False,
                                                 1e-5),
        "block_fwd_eval": block_fwd,
        "cudnn_dw_conv": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1, 1, c),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.gpu_profile: no CUDA device here", file=sys.stderr)
        return 2
    todo = cases()
    for fn in todo.values():  # warm-up, outside the profiled range
        fn()
    torch.cuda.synchronize()
    for name, fn in todo.items():
        torch.cuda.profiler.start()
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        torch.cuda.profiler.stop()
    print("profiled:", ", ".join(todo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
