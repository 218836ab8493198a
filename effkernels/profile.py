"""effkernels.profile: parameters, multiply-adds and activation traffic of a model, layer by layer.

    p = effkernels.profile(effkernels.models.create_model("mobilenetv2_100"), 224)
    p.params, p.macs          # 3504872, 300774272 (the paper: 3.4M, 300M)
    print(p)                  # an aligned table, one row per layer
    p.to_csv("mnv2.csv")      # the same rows as CSV; p.as_dict() for JSON

The model runs once, on a real tensor (batch 1, 3 x input_size x input_size, on the device of
the model's parameters) under a TorchDispatchMode that sees every ATen op and every effkernels
op (torch.ops.effkernels.* and, when loaded, torch.ops.effkernels_triton.*). A *layer* is one
convolution or linear op (aten.convolution, aten.addmm/mm, dwconv_bn_act, pwconv_bn_act,
mixconv_bn_act, the Triton inverted_residual), together with the BatchNorm, activation and
residual-add ops that directly follow it on its output; the layer is named after the module
that owns its weight. Other ops that move activations (global pooling, the squeeze-excite
multiply, padding, concatenation) are rows of their own with no multiply-adds. So effkernels
models, effkernels.convert-ed torchvision/timm models and plain torch.nn models are all counted
the same way.

Counting conventions (those that reproduce the MobileNet/MnasNet/MixNet/EfficientNet papers; see
tests/test_profile.py):

* multiply-adds (MACs): convolutions (dense, grouped, depthwise, 1x1, and squeeze-excite's 1x1
  convolutions on the pooled vector) and fully-connected layers: output positions x weight
  elements. BatchNorm (foldable into the conv), biases, activations, pooling and elementwise ops
  are not counted. A grouped 1x1 convolution that effkernels runs as one block-diagonal GEMM
  (MixNet's split pointwise) is counted as the grouped convolution it is (the zero blocks are
  not model arithmetic). torch.utils.flop_counter.FlopCounterMode reports 2 x MACs as FLOPs for
  the same ops (and the block-diagonal GEMM's dense FLOPs).
* params: every trainable parameter, BatchNorm's weight and bias included (running statistics
  are buffers and excluded).
* activation bytes (element size x elements), read and written, two ways:
  - unfused: every conv, BatchNorm, activation and residual add is its own kernel that reads its
    input from memory and writes its output (conv reads x, writes y; BN reads y, writes y; ...);
  - fused: what effkernels' ops read and write: dwconv_bn_act / pwconv_bn_act / mixconv_bn_act
    read x (and the residual) once and write the output once; a block that runs as
    effkernels.ops.inverted_residual is counted as the fused block kernel (the Triton one): it
    reads its input and writes its output only, the expanded tensors never reach memory (so do
    the fused CPU and CUDA inference kernels; in training the C++ op composes the single ops, so
    there this is the target, not the measurement).
    Ops effkernels does not fuse (the dense stem conv + BN + act, pooling, SE's multiply) count
    as they run.
  Weights are not counted. intensity = MACs / bytes (MACs per byte of activation traffic).

Against the papers (224x224, 1000 classes; tests/test_profile.py): MobileNetV1 568.7M / 4.23M
(paper 569M / 4.2M), its full-conv variant 4867.3M / 29.29M (4866M / 29.3M: the paper's 4866
leaves out the FC layer it counts in 569), MobileNetV2 300.8M / 3.50M (300M / 3.4M, truncated;
3.4M is the count without BatchNorm's 34,112 parameters, 3.47M), MobileNetV3-Large 216.6M /
5.48M (219M / 5.4M: 219 not reproducible from the released model), -Small 56.5M / 2.54M (56M /
2.5M), MixNet-S 239.2M / 4.13M (256M / 4.1M) and -M 339.2M / 5.01M (360M / 5.0M: the papers'
MACs not reproducible), EfficientNet-B0 385.8M / 5.29M (0.39B / 5.3M), MnasNet-A1 311.6M /
3.89M (312M / 3.9M). Profile.bn_params gives the BatchNorm share of params.

The textbook example (an 8x8x3 input, 5x5 kernels, 256 output channels):

    >>> import torch, effkernels
    >>> standard = torch.nn.Conv2d(3, 256, 5, padding=2, bias=False)
    >>> separable = torch.nn.Sequential(
    ...     effkernels.nn.DepthwiseConvBNAct(3, 5, act="identity"),
    ...     effkernels.nn.PointwiseConvBNAct(3, 256, act="identity"))
    >>> effkernels.profile(standard, (3, 8, 8)).macs          # 5*5*3*256*8*8
    1228800
    >>> [l.macs for l in effkernels.profile(separable, (3, 8, 8)).layers]  # 5*5*3*8*8, 3*256*8*8
    [4800, 49152]
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import _extension

__all__ = ["profile", "Profile", "LayerProfile", "register_flop_formulas"]

_NAMESPACES = ("effkernels", "effkernels_triton")
_EFFK_CONVS = ("dwconv_bn_act", "pwconv_bn_act", "mixconv_bn_act")
_ACT_OPS = {"relu": "relu", "relu_": "relu", "hardtanh": "relu6", "hardtanh_": "relu6",
            "hardswish": "hswish", "hardswish_": "hswish", "silu": "silu", "silu_": "silu",
            "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "hardsigmoid": "hsigmoid",
            "hardsigmoid_": "hsigmoid", "clamp": "clamp", "clamp_": "clamp", "gelu": "gelu",
            "tanh": "tanh"}
_BN_OPS = ("_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
           "native_batch_norm", "batch_norm", "cudnn_batch_norm", "miopen_batch_norm")


@dataclass
class LayerProfile:
    """One row: a conv/linear layer (with the BN/act/add ops fused or folded into it) or another
    op that moves activations. Bytes are activation bytes (see the module docstring)."""
    name: str
    type: str
    output_shape: Tuple[int, ...]
    params: int
    macs: int
    unfused_read: int
    unfused_write: int
    fused_read: int
    fused_write: int

    @property
    def unfused_bytes(self) -> int:
        return self.unfused_read + self.unfused_write

    @property
    def fused_bytes(self) -> int:
        return self.fused_read + self.fused_write

    @property
    def unfused_intensity(self) -> float:
        """MACs per activation byte, every conv/BN/act its own kernel."""
        return _ratio(self.macs, self.unfused_bytes)

    @property
    def fused_intensity(self) -> float:
        """MACs per activation byte with effkernels' fusion (inf: no traffic of its own, inside
        a fused block)."""
        return _ratio(self.macs, self.fused_bytes)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["output_shape"] = list(self.output_shape)
        d.update(unfused_bytes=self.unfused_bytes, fused_bytes=self.fused_bytes,
                 unfused_intensity=self.unfused_intensity, fused_intensity=self.fused_intensity)
        return d


def _ratio(a: int, b: int) -> float:
    return a / b if b else (0.0 if a == 0 else math.inf)


@dataclass
class Profile:
    """The result of effkernels.profile: totals and one LayerProfile per layer, in run order."""
    model: str
    input_shape: Tuple[int, ...]
    params: int
    macs: int
    layers: List[LayerProfile] = field(default_factory=list)
    bn_params: int = 0  # of params: BatchNorm weights and biases (foldable into the convs)

    @property
    def unfused_bytes(self) -> int:
        return sum(layer.unfused_bytes for layer in self.layers)

    @property
    def fused_bytes(self) -> int:
        return sum(layer.fused_bytes for layer in self.layers)

    @property
    def unfused_intensity(self) -> float:
        return _ratio(self.macs, self.unfused_bytes)

    @property
    def fused_intensity(self) -> float:
        return _ratio(self.macs, self.fused_bytes)

    @property
    def layer_params(self) -> int:
        """The parameters the layers used (params counts every parameter of the model once)."""
        return sum(layer.params for layer in self.layers)

    def as_dict(self) -> dict:
        return dict(model=self.model, input_shape=list(self.input_shape), params=self.params,
                    bn_params=self.bn_params, macs=self.macs, unfused_bytes=self.unfused_bytes,
                    fused_bytes=self.fused_bytes, unfused_intensity=self.unfused_intensity,
                    fused_intensity=self.fused_intensity,
                    layers=[layer.as_dict() for layer in self.layers])

    _CSV_FIELDS = ("name", "type", "output_shape", "params", "macs", "unfused_read",
                   "unfused_write", "fused_read", "fused_write", "unfused_intensity",
                   "fused_intensity")

    def to_csv(self, path) -> None:
        """One row per layer (output_shape as 'N x C x H x W'), then a 'total' row."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self._CSV_FIELDS)
            for layer in self.layers:
                d = layer.as_dict()
                d["output_shape"] = "x".join(str(s) for s in layer.output_shape)
                writer.writerow([d[k] for k in self._CSV_FIELDS])
            reads = (sum(layer.unfused_read for layer in self.layers),
                     sum(layer.unfused_write for layer in self.layers),
                     sum(layer.fused_read for layer in self.layers),
                     sum(layer.fused_write for layer in self.layers))
            writer.writerow(["total", "", "x".join(str(s) for s in self.input_shape),
                             self.params, self.macs, *reads, self.unfused_intensity,
                             self.fused_intensity])

    def __str__(self) -> str:
        header = ("layer", "type", "output", "params", "MACs", "unfused KiB r/w",
                  "fused KiB r/w", "MAC/B unf", "MAC/B fus")
        rows = [header]
        for layer in self.layers:
            rows.append((layer.name, layer.type, "x".join(str(s) for s in layer.output_shape[1:]),
                         f"{layer.params:,}", f"{layer.macs:,}",
                         f"{_kib(layer.unfused_read)}/{_kib(layer.unfused_write)}",
                         f"{_kib(layer.fused_read)}/{_kib(layer.fused_write)}",
                         _fmt_ai(layer.unfused_intensity), _fmt_ai(layer.fused_intensity)))
        ur = sum(layer.unfused_read for layer in self.layers)
        uw = sum(layer.unfused_write for layer in self.layers)
        fr = sum(layer.fused_read for layer in self.layers)
        fw = sum(layer.fused_write for layer in self.layers)
        rows.append(("total", "", "x".join(str(s) for s in self.input_shape[1:]),
                     f"{self.params:,}", f"{self.macs:,}", f"{_kib(ur)}/{_kib(uw)}",
                     f"{_kib(fr)}/{_kib(fw)}", _fmt_ai(self.unfused_intensity),
                     _fmt_ai(self.fused_intensity)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        left = (0, 1, 2)

        def line(r):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        rule = "-" * len(line(header))
        title = (f"{self.model}: input {'x'.join(str(s) for s in self.input_shape)}, "
                 f"{self.params:,} params ({self.params / 1e6:.2f}M), {self.macs:,} MACs "
                 f"({self.macs / 1e6:.1f}M), activation traffic {self.unfused_bytes / 2**20:.1f} "
                 f"MiB unfused, {self.fused_bytes / 2**20:.1f} MiB fused")
        body = [line(r) for r in rows]
        return "\n".join([title, line(header), rule] + body[1:-1] + [rule, body[-1]])

    def __repr__(self) -> str:
        return (f"Profile(model={self.model!r}, input_shape={self.input_shape}, "
                f"params={self.params}, macs={self.macs}, layers={len(self.layers)})")


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def _fmt_ai(v: float) -> str:
    return "-" if math.isinf(v) else f"{v:.2f}"


# ---- the tracer -----------------------------------------------------------------------------

def _key(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr() or None  # 0: empty, shared by all empties
    except Exception:  # no storage (sparse, nested, some subclasses)
        return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _common_module(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


class _Layer:
    """A row under construction."""

    def __init__(self, name, type_, out, params, macs, unfused_read, unfused_write, fused_read,
                 fused_write, block=None):
        self.name, self.type, self.out = name, type_, out
        self.out_key = _key(out)
        self.params, self.macs = params, macs
        self.unfused = [unfused_read, unfused_write]
        self.fused = [fused_read, fused_write]
        self.block = block
        self.post: List[str] = []

    def done(self) -> LayerProfile:
        type_ = self.type + "".join(f"+{p}" for p in self.post)
        return LayerProfile(self.name, type_, tuple(self.out.shape), self.params, self.macs,
                            *self.unfused, *self.fused)


class _Tracer(TorchDispatchMode):
    """Records every op that reads activations (tensors computed from the input)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.param_names: Dict[int, str] = {}  # storage -> parameter name
        for name, p in model.named_parameters():
            k = _key(p)
            if k is not None:
                self.param_names[k] = name
        self.buffers = {k for k in (_key(b) for b in model.buffers()) if k is not None}
        self.derived: Dict[int, List[Tuple[str, int]]] = {}  # weight-derived -> (param, numel)
        self.acts: set = set()
        self.keep: List[torch.Tensor] = []  # keeps storages alive, so that keys stay unique
        self.stack: List[str] = []
        self.blocks: List[Optional[Tuple[str, int]]] = []
        self.block_io: Dict[Tuple[str, int], List[int]] = {}
        self.layers: List[_Layer] = []
        self.current: Optional[_Layer] = None

    # -- module context (forward hooks) --
    def enter(self, name: str, module: nn.Module, args) -> None:
        self.stack.append(name)
        block = None
        if _fuses_block(module):
            block = (name, len(self.block_io))
            xs = [t for t in _tensors(args) if _key(t) in self.acts]
            self.block_io[block] = [_nbytes(xs[0]) if xs else 0, 0]
        elif self.blocks:
            block = self.blocks[-1]
        self.blocks.append(block)

    def leave(self, name: str, module: nn.Module, output) -> None:
        block = self.blocks.pop()
        if block is not None and block[0] == name:
            outs = _tensors(output)
            self.block_io[block][1] = _nbytes(outs[0]) if outs else 0
        self.stack.pop()

    # -- weights --
    def sources(self, t: torch.Tensor) -> Optional[List[Tuple[str, int]]]:
        """The parameters a weight tensor is (a view of) or was computed from, with the numbers
        of their elements it holds; None for an activation or a constant."""
        k = _key(t)
        if k in self.param_names:
            return [(self.param_names[k], t.numel())]
        return self.derived.get(k)

    def weight_numel(self, t: torch.Tensor) -> int:
        src = self.sources(t)
        return sum(n for _, n in src) if src else t.numel()

    def param_count(self, tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            for name, n in self.sources(t) or []:
                if (name, n) not in seen:
                    seen.add((name, n))
                    total += n
        return total

    def owner(self, tensors) -> str:
        names = [name.rsplit(".", 1)[0] if "." in name else ""
                 for t in tensors for name, _ in (self.sources(t) or [])]
        if names:
            return _common_module(names) or names[0]
        return self.stack[-1] if self.stack else ""

    # -- ops --
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out) -> None:
        if getattr(func, "is_view", False):
            return  # same storage: an activation's view is an activation, a weight's a weight
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if not outs:
            return
        act_in = [t for t in ins if _key(t) in self.acts]
        if not act_in:
            src = [s for t in ins for s in (self.sources(t) or [])]
            if src:  # weight preparation (block_diag of split 1x1 weights, dtype casts)
                for o in outs:
                    self.derived[_key(o)] = src
                self.keep += outs
            return
        for o in outs:
            self.acts.add(_key(o))
        self.keep += outs
        ns, name = func.namespace, func._opname
        block = self.blocks[-1] if self.blocks else None
        if ns in _NAMESPACES and name in _EFFK_CONVS:
            self.effk_layer(name, args, outs[0], block)
        elif ns in _NAMESPACES and name in ("inverted_residual", "inverted_residual_inference"):
            self.block_layer(args, outs[0], block)
        elif ns == "aten" and name in ("convolution", "_convolution"):
            self.conv_layer(args, outs[0], block)
        elif ns == "aten" and name in ("addmm", "mm", "bmm", "matmul", "linear"):
            self.matmul_layer(name, args, act_in, outs[0], block)
        elif self.folds(name, act_in, outs[0]):
            read = sum(_nbytes(t) for t in act_in)
            write = _nbytes(outs[0])
            layer = self.current
            layer.post.append("bn" if name in _BN_OPS else _ACT_OPS.get(name, name.rstrip("_")))
            layer.params += self.param_count(t for t in ins if _key(t) not in self.acts)
            layer.out, layer.out_key = outs[0], _key(outs[0])
            layer.unfused[0] += read
            layer.unfused[1] += write
            layer.fused[0] += read
            layer.fused[1] += write
        else:
            read = sum(_nbytes(t) for t in act_in)
            write = _nbytes(outs[0])
            self.layers.append(_Layer(self.stack[-1] if self.stack else "", name, outs[0],
                                      self.param_count(ins), 0, read, write, read, write,
                                      block))
            self.current = None

    def folds(self, name: str, act_in, out) -> bool:
        """A BatchNorm / activation / elementwise op on the current layer's output, same shape:
        part of that layer (conv -> BN -> act [-> + residual])."""
        layer = self.current
        if layer is None or tuple(out.shape) != tuple(layer.out.shape):
            return False
        if layer.out_key not in {_key(t) for t in act_in}:
            return False
        return name in _BN_OPS or name in _ACT_OPS or name in ("add", "add_", "mul", "mul_")

    def push(self, layer: _Layer) -> None:
        self.layers.append(layer)
        self.current = layer

    def effk_layer(self, op, args, out, block) -> None:
        x = args[0]
        weights = list(args[1]) if op == "mixconv_bn_act" else [args[1]]
        bn = [t for t in args[2:4] if isinstance(t, torch.Tensor)]
        act = args[9] if op == "dwconv_bn_act" else (args[7] if op == "pwconv_bn_act"
                                                     else args[8])
        residual = args[6] if op == "pwconv_bn_act" else None
        positions = out.numel() // out.shape[1]
        macs = positions * sum(self.weight_numel(w) for w in weights)
        y, xb = _nbytes(out), _nbytes(x)
        rb = _nbytes(residual) if residual is not None else 0
        n_eltwise = 1 + (act != "identity")  # BN, act
        unfused_read = xb + n_eltwise * y + (y + rb if residual is not None else 0)
        unfused_write = y * (1 + n_eltwise + (residual is not None))
        if op == "pwconv_bn_act":
            desc = f"pwconv_bn_act {act}" + ("+res" if residual is not None else "")
        else:
            stride = args[6]
            ks = ".".join(str(w.shape[-1]) for w in weights)
            desc = f"{op} k{ks}" + (f"/{stride}" if stride != 1 else "") + f" {act}"
        self.push(_Layer(self.owner(weights), desc, out, self.param_count(weights + bn), macs,
                         unfused_read, unfused_write, xb + rb, y, block))

    def block_layer(self, args, out, block) -> None:
        """One opaque fused block: effkernels_triton::inverted_residual, or the C++
        inverted_residual_inference (same leading arguments)."""
        x, expand, depthwise, se, project, stride = args[:6]
        n, _, h, w = x.shape
        positions = out.numel() // out.shape[1]
        macs = positions * (self.weight_numel(depthwise[0]) + self.weight_numel(project[0]))
        if expand:
            macs += n * h * w * self.weight_numel(expand[0])
        if se:
            macs += n * (self.weight_numel(se[0]) + self.weight_numel(se[2]))
        mid = (expand[0].shape[0] if expand else x.shape[1]) * x.element_size()
        xb, y = _nbytes(x), _nbytes(out)
        e = n * h * w * mid if expand else 0
        d = positions * mid
        # unfused: expand conv/BN/act, dw conv/BN/act, SE (pool, scale), project conv/BN, add
        reads = xb + 2 * e + e + 2 * d + (2 * d if se else 0) + d + y + (y + xb if args[10] else 0)
        writes = 3 * e + 3 * d + (d if se else 0) + 2 * y + (y if args[10] else 0)
        params = self.param_count(list(expand[:3]) + list(depthwise[:3]) + list(se)
                                  + list(project[:3]))
        self.push(_Layer(self.stack[-1] if self.stack else "", f"inverted_residual/{stride}",
                         out, params, macs, reads, writes, xb, y, None))

    def conv_layer(self, args, out, block) -> None:
        x, weight, bias = args[0], args[1], args[2]
        stride, transposed, groups = args[3], args[6], args[8]
        kh, kw = weight.shape[-2:]
        positions = (x.numel() // x.shape[1]) if transposed else (out.numel() // out.shape[1])
        macs = positions * self.weight_numel(weight)
        if groups == 1:
            kind = "conv"
        elif groups == x.shape[1] == out.shape[1]:
            kind = "dwconv"
        else:
            kind = f"gconv(g={groups})"
        s = stride[0] if isinstance(stride, (list, tuple)) else stride
        desc = f"{kind} k{kh}" + ("" if kh == kw else f"x{kw}") + (f"/{s}" if s != 1 else "")
        tensors = [weight] + ([bias] if isinstance(bias, torch.Tensor) else [])
        xb, y = _nbytes(x), _nbytes(out)
        self.push(_Layer(self.owner([weight]), desc, out, self.param_count(tensors), macs,
                         xb, y, xb, y, block))

    def matmul_layer(self, op, args, act_in, out, block) -> None:
        mats = [t for t in args if isinstance(t, torch.Tensor)]
        if op == "addmm":
            bias, a, b = mats[:3]
        else:
            bias, (a, b) = None, mats[:2]
        weights = [t for t in (a, b) if _key(t) not in self.acts]
        if weights:
            positions = out.numel() // out.shape[-1]
            macs = positions * self.weight_numel(weights[0])
            name = self.owner(weights)
        else:  # activation x activation
            macs = out.numel() * a.shape[-1]
            name = self.stack[-1] if self.stack else ""
        tensors = weights + ([bias] if isinstance(bias, torch.Tensor) else [])
        read = sum(_nbytes(t) for t in act_in)
        y = _nbytes(out)
        self.push(_Layer(name, "linear" if weights else "matmul", out, self.param_count(tensors),
                         macs, read, y, read, y, block))

    def finish(self) -> List[LayerProfile]:
        """Applies the fused-block model: the rows inside one inverted_residual block share its
        traffic (the first reads the block's input, the last writes its output)."""
        by_block: Dict[Tuple[str, int], List[_Layer]] = {}
        for layer in self.layers:
            if layer.block is not None:
                by_block.setdefault(layer.block, []).append(layer)
        for block, rows in by_block.items():
            for layer in rows:
                layer.fused = [0, 0]
            rows[0].fused[0], rows[-1].fused[1] = self.block_io[block]
        return [layer.done() for layer in self.layers]


def _fuses_block(module: nn.Module) -> bool:
    """Whether this module's forward runs effkernels.ops.inverted_residual."""
    from .nn.blocks import _Block, _drop_active

    if not isinstance(module, _Block):
        return False
    try:
        return module._fusable(_drop_active(module._part("drop_path")))
    except Exception:
        return False


def _input_shape(model: nn.Module, input_size) -> Tuple[int, ...]:
    default = getattr(model, "default_input_size", None)
    if input_size is None:
        if default is None:
            raise ValueError("profile: input_size is required for a model without "
                             "default_input_size; e.g. 224 or (3, 224, 224)")
        return (1, *default)
    if isinstance(input_size, int):
        chans = default[0] if default is not None else 3
        return (1, chans, input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 2:
        chans = default[0] if default is not None else 3
        return (1, chans, *shape)
    if len(shape) == 3:
        return (1, *shape)
    if len(shape) == 4:
        return shape
    raise ValueError(f"profile: input_size must be an int (H = W), (H, W), (C, H, W) or "
                     f"(N, C, H, W); got {input_size!r}")


def profile(model: nn.Module, input_size: Union[int, Sequence[int], None] = None) -> Profile:
    """Parameters, multiply-adds and activation bytes of `model`, per layer (see the module
    docstring for what is counted). input_size: H (= W), (H, W), (C, H, W) or (N, C, H, W); None:
    the model's default_input_size (effkernels.models set it). The model runs once in eval mode
    under torch.no_grad() on a random tensor on its parameters' device and dtype; its training
    flags are restored afterwards."""
    register_flop_formulas()  # the Triton namespace may have been loaded since import
    shape = _input_shape(model, input_size)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    if device.type == "meta":
        raise ValueError("profile: the model's parameters are on the meta device; materialise "
                         "it (e.g. model.to_empty(device='cpu')) first")
    x = torch.randn(shape, device=device, dtype=dtype)
    tracer = _Tracer(model)
    tracer.acts.add(_key(x))
    names = {id(m): n for n, m in model.named_modules()}
    handles = []
    for module in model.modules():
        name = names[id(module)]
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name: tracer.enter(name, m, a)))
        handles.append(module.register_forward_hook(
            lambda m, a, o, name=name: tracer.leave(name, m, o)))
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), tracer:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t
    layers = tracer.finish()
    params = sum(p.numel() for p in model.parameters())
    bn_params = sum(p.numel() for m in model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for p in m.parameters(recurse=False))
    label = getattr(model, "model_name", None) or type(model).__name__
    return Profile(label, shape, params, sum(layer.macs for layer in layers), layers, bn_params)


# ---- FLOP formulas for torch.utils.flop_counter ---------------------------------------------

def _prod(shape) -> int:
    return math.prod(shape)


def _dw_flop(x, weight, *args, out_shape=None, **kwargs) -> int:
    n, _, ho, wo = out_shape[0]
    return 2 * n * ho * wo * _prod(weight)


def _pw_flop(x, weight, *args, out_shape=None, **kwargs) -> int:
    n, _, h, w = out_shape[0]
    return 2 * n * h * w * _prod(weight)


def _mix_flop(x, weights, *args, out_shape=None, **kwargs) -> int:
    n, _, ho, wo = out_shape[0]
    return 2 * n * ho * wo * sum(_prod(w) for w in weights)


def _backward(forward):
    """grad_x and grad_weight, each a convolution as large as the forward one."""
    def flop(grad_out, x, weight, *args, out_shape=None, **kwargs) -> int:
        return 2 * forward(x, weight, out_shape=(grad_out,))
    return flop


def _ir_flop(x, expand, depthwise, se, project, *args, out_shape=None, **kwargs) -> int:
    n, _, h, w = x
    out = out_shape[0] if isinstance(out_shape[0], (tuple, list)) else out_shape  # (out, stats)
    _, _, ho, wo = out
    macs = n * ho * wo * (_prod(depthwise[0]) + _prod(project[0]))
    if expand:
        macs += n * h * w * _prod(expand[0])
    if se:
        macs += n * (_prod(se[0]) + _prod(se[2]))
    return 2 * macs


def _ir_backward_flop(grad_out, x, expand, depthwise, se, project, *args, out_shape=None,
                      **kwargs) -> int:
    return 2 * _ir_flop(x, expand, depthwise, se, project, out_shape=(grad_out,))


_FORMULAS = {
    "dwconv_bn_act": _dw_flop, "dwconv_bn_act_backward": _backward(_dw_flop),
    "pwconv_bn_act": _pw_flop, "pwconv_bn_act_backward": _backward(_pw_flop),
    "mixconv_bn_act": _mix_flop, "mixconv_bn_act_backward": _backward(_mix_flop),
    "inverted_residual": _ir_flop, "inverted_residual_backward": _ir_backward_flop,
    "inverted_residual_inference": _ir_flop,
}


def _packet(namespace: str, name: str):
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def register_flop_formulas() -> List[str]:
    """Registers FLOP formulas (2 x multiply-adds of the convolutions, as torch's own for
    aten.convolution) for the effkernels ops with torch.utils.flop_counter, so that
    FlopCounterMode counts them: the C++ ops (when effkernels._C is loaded) and the Triton
    namespace effkernels_triton when it has been loaded (this does not import triton; call it
    again after first use of the triton backend). The C++ inverted_residual is
    CompositeImplicitAutograd: FlopCounterMode sees the dw/pw ops it is made of. Idempotent;
    returns the qualified names now registered."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    done = []
    namespaces = [ns for ns in _NAMESPACES if ns != "effkernels" or _extension.loaded()]
    for ns in namespaces:
        for name, formula in _FORMULAS.items():
            if ns == "effkernels" and name in ("inverted_residual",
                                               "inverted_residual_backward"):
                continue  # composite: its parts are counted
            packet = _packet(ns, name)
            if packet is None:
                continue
            if packet not in flop_registry:
                register_flop_formula(packet)(formula)
            done.append(f"{ns}::{name}")
    return done


register_flop_formulas()
