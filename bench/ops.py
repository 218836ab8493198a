"""Op suite: dwconv_bn_act, pwconv_bn_act and mixconv_bn_act at the layer shapes of MobileNetV2,
MobileNetV3-Large and MixNet-S/M (224x224), in three modes:

  fwd      eval-mode forward (running statistics), under torch.no_grad
  bwd      train-mode backward alone (the forward is run once; gradients w.r.t. x, the conv
           weights, BN weight/bias and the residual)
  fwd+bwd  train-mode forward (batch statistics, running averages updated) + that backward

Baselines: PyTorch eager (the plain-PyTorch definition in effkernels.reference: conv2d ->
batch_norm -> act) on NCHW and channels_last input, torch.compile (inductor) of that function
on channels_last input and, for fwd on CPU in float32, ONNX Runtime. Ours: the op on
channels_last input. Each implementation is checked against the float64 reference first.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from effkernels import ops, reference

from . import harness
from .harness import Built, Case

CL = torch.channels_last

# MobileNetV2 depthwise layers: (C, H, k, stride, act).
MBV2_DW = [(32, 112, 3, 1, "relu6"), (96, 112, 3, 2, "relu6"), (144, 56, 3, 1, "relu6"),
           (144, 56, 3, 2, "relu6"), (192, 28, 3, 1, "relu6"), (192, 28, 3, 2, "relu6"),
           (384, 14, 3, 1, "relu6"), (576, 14, 3, 1, "relu6"), (576, 14, 3, 2, "relu6"),
           (960, 7, 3, 1, "relu6")]
# MobileNetV3-Large depthwise layers not already above.
MBV3_DW = [(16, 112, 3, 1, "relu"), (64, 112, 3, 2, "relu"), (72, 56, 3, 1, "relu"),
           (72, 56, 5, 2, "relu"), (120, 28, 5, 1, "relu"), (240, 28, 3, 2, "hswish"),
           (200, 14, 3, 1, "hswish"), (184, 14, 3, 1, "hswish"), (480, 14, 3, 1, "hswish"),
           (672, 14, 3, 1, "hswish"), (672, 14, 5, 2, "hswish"), (960, 7, 5, 1, "hswish")]
# Pointwise layers: (Cin, Cout, H, act, residual). MobileNetV2, then MobileNetV3-Large.
MBV2_PW = [(16, 96, 112, "relu6", False), (24, 144, 56, "relu6", False),
           (32, 192, 28, "relu6", False), (64, 384, 14, "relu6", False),
           (96, 576, 14, "relu6", False), (160, 960, 7, "relu6", False),
           (32, 16, 112, "identity", False), (144, 24, 56, "identity", True),
           (192, 32, 28, "identity", True), (384, 64, 14, "identity", True),
           (576, 96, 14, "identity", True), (960, 160, 7, "identity", True),
           (320, 1280, 7, "relu6", False)]
MBV3_PW = [(40, 120, 28, "relu", False), (80, 480, 14, "hswish", False),
           (112, 672, 14, "hswish", False), (672, 112, 14, "identity", True)]
# MixNet-S and -M mixed depthwise layers (input C, input H, kernel sizes, stride, act); the
# channels are split equally (as timm's _split_channels does for these).
MIXNET_S = [(144, 56, (3, 5, 7), 2, "silu"), (240, 28, (3, 5), 1, "silu"),
            (240, 28, (3, 5, 7), 2, "silu"), (480, 14, (3, 5), 1, "silu"),
            (480, 14, (3, 5, 7), 1, "silu"), (360, 14, (3, 5, 7, 9), 1, "silu"),
            (720, 14, (3, 5, 7, 9, 11), 2, "silu"), (1200, 7, (3, 5, 7, 9), 1, "silu")]
MIXNET_M = [(144, 112, (3, 5, 7), 2, "relu"), (192, 56, (3, 5, 7, 9), 2, "silu"),
            (480, 14, (3, 5, 7, 9), 1, "silu"), (720, 14, (3, 5, 7, 9), 2, "silu")]
# (the other MixNet-M layers are MixNet-S's)

QUICK = {"dwconv_bn_act": [(144, 56, 3, 1, "relu6")],
         "pwconv_bn_act": [(24, 144, 56, "relu6", False)],
         "mixconv_bn_act": [(240, 28, (3, 5), 1, "silu")]}
QUICK_MODES = {"dwconv_bn_act": ("fwd", "bwd"), "pwconv_bn_act": ("fwd", "fwd+bwd"),
               "mixconv_bn_act": ("fwd", "fwd+bwd")}


def dw_label(c, h, k, stride, act) -> str:
    """The CSV's shape of a depthwise case (an MBV2_DW/MBV3_DW tuple)."""
    return f"C{c} {h}x{h} k{k} s{stride} {act}"


def pw_label(cin, cout, h, act, residual) -> str:
    """The CSV's shape of a pointwise case (an MBV2_PW/MBV3_PW tuple)."""
    return f"{cin}->{cout} {h}x{h} {act}{' +res' if residual else ''}"


def _split(c: int, groups: int) -> List[int]:
    sizes = [c // groups] * groups
    sizes[0] += c - sum(sizes)
    return sizes


def _build(eager: Callable, ours: Callable, inputs: List[torch.Tensor], acts: Sequence[int],
           grads: Sequence[int], mode: str, opts) -> Built:
    """eager/ours: functions of `inputs`; acts: indices of the activations (NCHW <-> CL and the
    only non-constant inputs of the ONNX graph); grads: indices differentiated in train modes."""
    device, dtype = opts.device, opts.dtype
    inputs = [t.to(device, dtype) for t in inputs]
    cl = [t.contiguous(memory_format=CL) if i in acts else t for i, t in enumerate(inputs)]
    nchw = [t.contiguous() if i in acts else t for i, t in enumerate(inputs)]
    train = mode != "fwd"
    if train:  # leaves; the NCHW activations are their own leaves, the parameters shared
        shared = {i: t.detach().requires_grad_() for i, t in enumerate(cl) if i in grads
                  and i not in acts}
        cl = [shared.get(i, t.detach().requires_grad_() if i in grads else t)
              for i, t in enumerate(cl)]
        nchw = [shared.get(i, t.detach().requires_grad_() if i in grads else t)
                for i, t in enumerate(nchw)]
    # Each implementation gets its own running statistics (train mode updates them in place).
    def fresh(ins):
        return [t.clone() if not t.requires_grad and t.dim() == 1 else t for t in ins]

    with torch.no_grad():
        out = eager(*cl)
    dy_cl = torch.randn_like(out) if train else None
    dy_nchw = dy_cl.contiguous() if train else None

    def make(name, fn, ins, dy, **kw):
        if not train:
            return harness.fwd_impl(name, fn, ins, **kw)
        wrt = [ins[i] for i in grads]
        return harness.grad_impl(name, fn, ins, wrt, dy, mode, **kw)

    impls = [make("eager_nchw", eager, fresh(nchw), dy_nchw),
             make("eager_cl", eager, fresh(cl), dy_cl)]
    skipped = {}
    if opts.compile_budget > 0:
        impls.append(make("compile", harness.compiled(eager), fresh(cl), dy_cl, compiles=True))
    else:
        skipped["compile"] = "--compile-budget 0"
    if not train and device == "cpu" and dtype == torch.float32 and opts.ort is None:
        consts = {i: t for i, t in enumerate(nchw) if i not in acts}

        def graph(*a):
            it = iter(a)
            return eager(*[consts[i] if i in consts else next(it) for i in range(len(nchw))])

        impls.append(harness.ort_impl(harness.fn_module(graph),
                                      [nchw[i] for i in acts]))
    elif not train and device == "cpu":
        skipped["onnxruntime"] = opts.ort or "float32 only"
    impls.append(make(harness.OURS, ours, fresh(cl), dy_cl))
    if opts.compile_ours:
        impls.append(make(harness.OURS_COMPILE, harness.compiled(ours), fresh(cl), dy_cl,
                          compiles=True))

    def ref():
        ins = [t.detach().to("cpu", torch.float64) for t in cl]
        if not train:
            return [eager(*ins)]
        ins = [t.requires_grad_() if i in grads else t for i, t in enumerate(ins)]
        o = eager(*ins)
        return [o.detach()] + list(torch.autograd.grad(o, [ins[i] for i in grads],
                                                       dy_cl.to("cpu", torch.float64)))

    return Built(impls, ref, tol=harness.TOL[dtype], skipped=skipped)


def _bn(c):
    return [torch.rand(c) + 0.5, torch.randn(c) * 0.1, torch.randn(c) * 0.1, torch.rand(c) + 0.5]


def dw_case(c, h, k, stride, act, n, mode, opts) -> Case:
    train = mode != "fwd"

    def eager(x, w, g, b, rm, rv):
        return reference.dwconv_bn_act(x, w, g, b, rm, rv, stride=stride, act=act,
                                       training=train)

    def ours(x, w, g, b, rm, rv):
        return ops.dwconv_bn_act(x, w, g, b, rm, rv, stride=stride, act=act, training=train)

    def build():
        torch.manual_seed(0)
        inputs = [torch.randn(n, c, h, h), torch.randn(c, 1, k, k) / k] + _bn(c)
        return _build(eager, ours, inputs, acts=[0], grads=[0, 1, 2, 3], mode=mode, opts=opts)

    return Case("ops", "dwconv_bn_act", dw_label(c, h, k, stride, act), n, mode, build)


def pw_case(cin, cout, h, act, residual, n, mode, opts) -> Case:
    train = mode != "fwd"

    def eager(x, w, g, b, rm, rv, *res):
        return reference.pwconv_bn_act(x, w, g, b, rm, rv, act=act,
                                       residual=res[0] if res else None, training=train)

    def ours(x, w, g, b, rm, rv, *res):
        return ops.pwconv_bn_act(x, w, g, b, rm, rv, act=act, residual=res[0] if res else None,
                                 training=train)

    def build():
        torch.manual_seed(0)
        inputs = [torch.randn(n, cin, h, h), torch.randn(cout, cin, 1, 1) / cin ** 0.5] + _bn(cout)
        acts, grads = [0], [0, 1, 2, 3]
        if residual:
            inputs.append(torch.randn(n, cout, h, h))
            acts, grads = [0, 6], [0, 1, 2, 3, 6]
        return _build(eager, ours, inputs, acts=acts, grads=grads, mode=mode, opts=opts)

    return Case("ops", "pwconv_bn_act", pw_label(cin, cout, h, act, residual), n, mode, build)


def mix_case(c, h, ks, stride, act, n, mode, opts) -> Case:
    train = mode != "fwd"

    def eager(x, g, b, rm, rv, *ws):
        return reference.mixconv_bn_act(x, list(ws), g, b, rm, rv, stride=stride, act=act,
                                        training=train)

    def ours(x, g, b, rm, rv, *ws):
        return ops.mixconv_bn_act(x, list(ws), g, b, rm, rv, stride=stride, act=act,
                                  training=train)

    def build():
        torch.manual_seed(0)
        ws = [torch.randn(ci, 1, k, k) / k for ci, k in zip(_split(c, len(ks)), ks)]
        inputs = [torch.randn(n, c, h, h)] + _bn(c) + ws
        grads = [0, 1, 2] + list(range(5, 5 + len(ws)))
        return _build(eager, ours, inputs, acts=[0], grads=grads, mode=mode, opts=opts)

    shape = f"C{c} {h}x{h} k{','.join(map(str, ks))} s{stride} {act}"
    return Case("ops", "mixconv_bn_act", shape, n, mode, build)


# Full run: every shape at N=8 in every mode (~165 cases, the bulk of `make bench`'s time;
# batch-1 latency is measured on the models). Add (1, 8) to fwd for per-layer batch-1 numbers.
FULL_MODES = (("fwd", (8,)), ("bwd", (8,)), ("fwd+bwd", (8,)))


def _dedupe(rows):
    return list(dict.fromkeys(rows))


# --targets: the cases the issues set speed targets on, per device.
# CPU (issue 2): the MobileNetV2 depthwise (k=3) and pointwise layers, eval forward, N=1 and 8
# (targets: dw >= 1.5x, pw >= 1.2x PyTorch eager channels_last).
CPU_TARGETS = {"dwconv_bn_act": [(s, ("fwd",), (1, 8)) for s in MBV2_DW],
               "pwconv_bn_act": [(s, ("fwd",), (1, 8)) for s in MBV2_PW],
               "mixconv_bn_act": []}
# GPU (issues 3 and 4; bench/gpu_check.sh: --targets --dtype float16): the k=3 depthwise layer
# at N=64 (forward; backward = its weight gradient), the pointwise GEMM, MixNet-M's mixconv.
GPU_TARGETS = {"dwconv_bn_act": [((144, 56, 3, 1, "relu6"), ("fwd", "bwd"), (64,))],
               "pwconv_bn_act": [((24, 144, 56, "relu6", False), ("fwd",), (64,))],
               "mixconv_bn_act": [(s, ("fwd",), (64,)) for s in MIXNET_M]}


def cases(opts) -> List[Case]:
    """Full: every shape in FULL_MODES. Quick: QUICK/QUICK_MODES at N=2. --targets: the
    device's target cases (CPU_TARGETS / GPU_TARGETS)."""
    tables = {"dwconv_bn_act": (dw_case, _dedupe(MBV2_DW + MBV3_DW + [(144, 56, 5, 1, "relu6"),
                                                                      (144, 56, 7, 1, "relu6")])),
              "pwconv_bn_act": (pw_case, MBV2_PW + MBV3_PW),
              "mixconv_bn_act": (mix_case, _dedupe(MIXNET_S + MIXNET_M))}
    out: List[Case] = []
    for op, (make, shapes) in tables.items():
        if getattr(opts, "targets", False):
            targets = CPU_TARGETS if opts.device == "cpu" else GPU_TARGETS
            out += [make(*s, n, mode, opts) for s, modes, batches in targets[op]
                    for mode in modes for n in batches]
            continue
        if opts.quick:
            out += [make(*s, 2, mode, opts) for mode in QUICK_MODES[op] for s in QUICK[op]]
            continue
        for mode, batches in FULL_MODES:
            out += [make(*s, n, mode, opts) for n in batches for s in shapes]
    return out

