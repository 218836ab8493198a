"""Op benchmarks: effkernels vs PyTorch eager (channels_last and NCHW) at the MobileNetV2 layer
shapes, in the same run. Each effkernels result is verified against the float64 reference
before it is timed; a wrong kernel is reported as WRONG, never timed as if right."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import effkernels
from effkernels import ops, reference

from .common import time_fn

CL = torch.channels_last

# MobileNetV2 (224x224) depthwise layers: (C, H, stride), k = 3.
MBV2_DW = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2),
           (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1)]
# MobileNetV2 pointwise layers: (Cin, Cout, H, act, residual).
MBV2_PW = [(16, 96, 112, "relu6", False), (24, 144, 56, "relu6", False),
           (32, 192, 28, "relu6", False), (64, 384, 14, "relu6", False),
           (96, 576, 14, "relu6", False), (160, 960, 7, "relu6", False),
           (32, 16, 112, "identity", False), (144, 24, 56, "identity", True),
           (192, 32, 28, "identity", True), (384, 64, 14, "identity", True),
           (576, 96, 14, "identity", True), (960, 160, 7, "identity", True),
           (320, 1280, 7, "relu6", False)]
QUICK_DW = [MBV2_DW[2], MBV2_DW[6]]
QUICK_PW = [MBV2_PW[1], MBV2_PW[7]]


@dataclass
class Case:
    op: str
    shape: str
    n: int
    ours: Callable[[], torch.Tensor]
    baselines: Dict[str, Callable[[], torch.Tensor]]
    check: Callable[[], Optional[str]]  # None if our result matches the reference


def _bn(c, dtype=torch.float32):
    g = torch.rand(c, dtype=dtype) + 0.5
    b = torch.randn(c, dtype=dtype) * 0.1
    rm = torch.randn(c, dtype=dtype) * 0.1
    rv = torch.rand(c, dtype=dtype) + 0.5
    return g, b, rm, rv


def _verify(ours: torch.Tensor, ref64: torch.Tensor, tol: float = 1e-4) -> Optional[str]:
    err = (ours.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    return None if err <= tol * scale else f"max error {err:.3g}"


def dw_case(c, h, stride, n, k=3) -> Case:
    x = torch.randn(n, c, h, h).contiguous(memory_format=CL)
    x_nchw = x.contiguous()
    w = torch.randn(c, 1, k, k) / k
    g, b, rm, rv = _bn(c)
    p = (k - 1) // 2

    def eager(inp):
        return lambda: F.relu6(F.batch_norm(F.conv2d(inp, w, None, stride, p, 1, c), rm, rv, g,
                                            b, False, 0.1, 1e-5))

    def ours():
        return ops.dwconv_bn_act(x, w, g, b, rm, rv, stride=stride, act="relu6")

    def check():
        ref = reference.dwconv_bn_act(x.double(), w.double(), g.double(), b.double(),
                                      rm.double(), rv.double(), stride=stride, act="relu6")
        return _verify(ours(), ref)

    return Case("dwconv_bn_act", f"C{c} {h}x{h} s{stride} k{k}", n, ours,
                {"eager_cl": eager(x), "eager_nchw": eager(x_nchw)}, check)


def pw_case(cin, cout, h, act, residual, n) -> Case:
    x = torch.randn(n, cin, h, h).contiguous(memory_format=CL)
    x_nchw = x.contiguous()
    w = torch.randn(cout, cin, 1, 1) / cin ** 0.5
    g, b, rm, rv = _bn(cout)
    res = torch.randn(n, cout, h, h).contiguous(memory_format=CL) if residual else None
    res_nchw = res.contiguous() if residual else None
    act_fn = {"relu6": F.relu6, "identity": lambda t: t}[act]

    def eager(inp, r):
        def run():
            z = F.batch_norm(F.conv2d(inp, w), rm, rv, g, b, False, 0.1, 1e-5)
            return act_fn(z + r if r is not None else z)
        return run

    def ours():
        return ops.pwconv_bn_act(x, w, g, b, rm, rv, act=act, residual=res)

    def check():
        ref = reference.pwconv_bn_act(x.double(), w.double(), g.double(), b.double(),
                                      rm.double(), rv.double(), act=act,
                                      residual=res.double() if residual else None)
        return _verify(ours(), ref)

    shape = f"{cin}->{cout} {h}x{h}{' +res' if residual else ''}"
    return Case("pwconv_bn_act", shape, n, ours,
                {"eager_cl": eager(x, res), "eager_nchw": eager(x_nchw, res_nchw)}, check)


def cases(quick: bool, op_filter: Optional[str]) -> List[Case]:
    out: List[Case] = []
    for n in (1, 8):
        if not op_filter or "dwconv" in op_filter:
            out += [dw_case(c, h, s, n) for c, h, s in (QUICK_DW if quick else MBV2_DW)]
            if not quick:
                out += [dw_case(144, 56, 1, n, k) for k in (5, 7)]
        if not op_filter or "pwconv" in op_filter:
            out += [pw_case(*a, n) for a in (QUICK_PW if quick else MBV2_PW)]
    return out


def run(device: str, quick: bool, op_filter: Optional[str], progress) -> List[dict]:
    """Eval-mode forward, fp32, channels_last input, on the CPU backend."""
    rows = []
    todo = cases(quick, op_filter)
    min_time = 0.1 if quick else 0.4
    with torch.no_grad(), effkernels.backend("cpu"):
        for i, case in enumerate(todo):
            progress(i, len(todo), f"{case.op} {case.shape} N={case.n}")
            problem = case.check()
            base = {"suite": "ops", "op": case.op, "shape": case.shape + f" N{case.n}",
                    "dtype": "float32", "mode": "eval-fwd"}
            timings = {name: time_fn(fn, device, min_time) for name, fn in case.baselines.items()}
            if problem is None:
                timings["effkernels"] = time_fn(case.ours, device, min_time)
            for impl, t in timings.items():
                # Baselines are PyTorch itself; only our kernels carry a verification status.
                rows.append({**base, "impl": impl, **t,
                             "verified": "ok" if impl == "effkernels" else ""})
            if problem is not None:
                rows.append({**base, "impl": "effkernels", "verified": f"WRONG: {problem}"})
            else:
                ours = timings["effkernels"]["median_ms"]
                for name in case.baselines:
                    rows.append({**base, "impl": "effkernels", "speedup_vs": name,
                                 "speedup": timings[name]["median_ms"] / ours})
    return rows
