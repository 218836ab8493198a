"""The inverted-residual family: one forward (_Block) for every layout of the block.

A layout (torchvision's MobileNetV2 block, timm's InvertedResidual / DepthwiseSeparableConv, or
a block adopted by effkernels.convert) only decides where the parameters live, so that its
state_dict keys are those of the model it replaces; `_roles` maps each role (expand_conv,
expand_bn, dw_conv, dw_bn, se_reduce, se_expand, project_conv, project_bn, drop_path) to a path of
child names. The forward runs the fused effkernels.ops.inverted_residual when the block is
what that op computes (in eval also MixNet's split convolutions: on the CPU as their parts'
weights, _weight_parts; elsewhere as dense weights, _dense_weight), and otherwise composes the
single ops (MixNet's split convolutions in training, TF 'same' padding, stochastic depth in
training, an activation after the projection, non-affine BatchNorm).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _extension, ops
from . import _functional as F_
from . import _sync
from .modules import (DropPath, Kernel, NotScriptable, SqueezeExcite, _check_act, make_conv,
                      make_divisible)

Path = Tuple[str, ...]


def _pointwise_ok(conv: Optional[nn.Module]) -> bool:
    """A plain, grouped or split 1x1 convolution without bias (or none)."""
    if conv is None:
        return True
    parts = F_.convs(conv)
    return bool(parts) and all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1)
                               and c.stride == (1, 1) and c.bias is None for c in parts)


def _depthwise_ok(conv: nn.Module) -> bool:
    """A depthwise convolution the fused op computes: square kernel, padded by d*(k-1)//2,
    one square stride. Split (MixConv): every group so, with one stride and dilation and odd
    kernel sizes (the smaller kernels centred in the largest one, F_.depthwise_weight)."""
    parts = F_.convs(conv)
    if not parts or not all(isinstance(c, nn.Conv2d) for c in parts):
        return False
    first = parts[0]
    for c in parts:
        k, d = c.kernel_size[0], c.dilation[0]
        if (c.kernel_size[1] != k or c.padding != (d * (k - 1) // 2,) * 2
                or c.stride[0] != c.stride[1] or c.groups != c.in_channels
                or c.out_channels != c.in_channels or c.bias is not None
                or (c.stride, c.dilation) != (first.stride, first.dilation)
                or (len(parts) > 1 and k % 2 == 0)):
            return False
    return True


def _own_weight(role: str, conv: Optional[nn.Module]) -> bool:
    """Whether the fused op takes this conv role's own weight (or there is no such conv)
    rather than one built from its parts (_Block._dense_weight)."""
    return conv is None or isinstance(conv, nn.Conv2d) and (conv.groups == 1
                                                            or role == "dw_conv")


_CONV_ROLES = ("expand_conv", "dw_conv", "project_conv")


def _weight_parts(role: str, conv: Optional[nn.Module]) -> Optional[List[torch.Tensor]]:
    """The weights of a split convolution's parts (MixNet's: 1x1 convs over channel groups, the
    diagonal blocks of a block-diagonal weight; MixConv's kernels), in the form the CPU
    inference kernels take them; None for a conv whose own weight the fused op takes, or a
    grouped conv (its parts would be new views on every call)."""
    if _own_weight(role, conv):
        return None
    convs = F_.convs(conv)
    if all(type(c) is nn.Conv2d and (c.groups == 1 or role == "dw_conv") for c in convs):
        return [c.weight for c in convs]
    return None


_VERSION = operator.attrgetter("_version")


def _drop_active(module: Optional[nn.Module]) -> bool:
    if module is None or not module.training:
        return False
    return float(getattr(module, "drop_prob", getattr(module, "p", 0.0)) or 0.0) > 0.0


class InferenceCaches:
    """A module keeping CPU inference caches in its __dict__: prepack_for_inference's packed
    weights and chained replay (_packed_cache), a block's replay (_replay) and MixNet's built
    weights (_dense_weights). Its copies (copy.deepcopy, pickle, torch.save of the model) do
    not take them (they refer to the original's modules and to PyTorch's global hook dicts):
    a prepacked copy packs and chains again at its first calls."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_replay", None)
        state.pop("_dense_weights", None)
        if state.get("_packed_cache") is not None:
            state["_packed_cache"] = {}
        return state


class _Block(InferenceCaches, NotScriptable, nn.Module):
    """expand 1x1+BN+act -> depthwise kxk+BN+act -> [SE] -> project 1x1+BN[+act] -> [+ x]."""

    _roles: Dict[str, Path]
    # prepack_for_inference: the packed eval-mode weights (ops._prepacked_block's cache); None:
    # pack on every call.
    _packed_cache: Optional[dict] = None

    def _setup(self, roles: Dict[str, Path], *, act: str, skip: bool, se_act: str = "relu",
               se_gate: str = "sigmoid", project_act: str = "identity",
               same: bool = False) -> None:
        self._roles = {k: tuple(v) for k, v in roles.items() if v is not None}
        self.act = _check_act("act", act)
        self.se_act = _check_act("se_act", se_act)
        self.se_gate = _check_act("se_gate", se_gate)
        self.project_act = _check_act("project_act", project_act)
        self.skip = bool(skip)
        self.same = bool(same)
        for role in ("dw_conv", "dw_bn", "project_conv", "project_bn"):
            if role not in self._roles:
                raise ValueError(f"{type(self).__name__}: the {role} role is required")
        for role in ("dw_bn", "project_bn", "expand_bn"):
            bn = self._part(role)
            if bn is not None and not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                raise TypeError(f"{type(self).__name__}: {role} must be an nn.BatchNorm2d "
                                f"(effkernels fuses BatchNorm); got {type(bn).__name__}")

    def _walk(self, path: Path) -> nn.Module:
        module = self
        for name in path:
            module = module._modules[name]
        return module

    def _part(self, role: str) -> Optional[nn.Module]:
        path = self._roles.get(role)
        return None if path is None else self._walk(path)

    def _parts(self) -> Dict[str, nn.Module]:
        """Every role's module, looked up once per forward (the blocks run ~17 times per
        batch-1 forward, where this Python is a few % of the time)."""
        return {role: self._walk(path) for role, path in self._roles.items()}

    def _fusable(self, drop_active: bool, parts: Optional[Dict[str, nn.Module]] = None
                 ) -> bool:
        """Whether effkernels.ops.inverted_residual computes exactly this block now."""
        if self.same or drop_active or self.project_act != "identity":
            return False
        parts = self._parts() if parts is None else parts
        expand, dw, project = parts.get("expand_conv"), parts["dw_conv"], parts["project_conv"]
        first = parts["dw_bn"]
        if any(not isinstance(conv, nn.Conv2d) or conv.groups != 1
               for conv in (expand, project) if conv is not None) \
                or not isinstance(dw, nn.Conv2d):
            # MixNet's split / grouped convolutions, as one dense weight each (_dense_weight):
            # in eval only; training composes the single ops (mixconv_bn_act's own kernel, no
            # zero taps).
            if first.training or not (_pointwise_ok(expand) and _pointwise_ok(project)):
                return False
        if not _depthwise_ok(dw):
            return False
        for role in ("expand_bn", "dw_bn", "project_bn"):
            bn = parts.get(role)
            if bn is None:
                continue
            if not bn.affine or bn.running_mean is None or not bn.track_running_stats:
                return False
            if _sync.group_of(bn) is not None:
                return False
            if (bn.training, bn.eps, bn.momentum) != (first.training, first.eps, first.momentum):
                return False
        return first.momentum is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            cache = self._packed_cache
            replay = self.__dict__.get("_replay") if cache is None else cache.get("replay")
            if replay is not None:
                out = replay(self, x)
                if out is not None:
                    return out
        parts = self._parts()
        drop = parts.get("drop_path")
        drop_active = _drop_active(drop)
        if self._fusable(drop_active, parts):
            return self._fused(x, parts)
        expand_conv = parts.get("expand_conv")
        h = x
        if expand_conv is not None:
            h = F_.pointwise(h, expand_conv, parts.get("expand_bn"), self.act)
        h = F_.depthwise(h, parts["dw_conv"], parts["dw_bn"], self.act, self.same)
        if "se_reduce" in parts:
            h = F_.squeeze_excite(h, parts["se_reduce"], parts["se_expand"], self.se_act,
                                  self.se_gate)
        project_conv, project_bn = parts["project_conv"], parts["project_bn"]
        if self.skip and not drop_active and self.project_act == "identity":
            return F_.pointwise(h, project_conv, project_bn, "identity", residual=x)
        h = F_.pointwise(h, project_conv, project_bn, self.project_act)
        if not self.skip:
            return h
        return (drop(h) if drop_active else h) + x.to(h.dtype)

    def _fused(self, x: torch.Tensor, parts: Dict[str, nn.Module]) -> torch.Tensor:
        dtype = F_.compute_dtype(x)
        dw, bn = F_.convs(parts["dw_conv"])[0], parts["dw_bn"]
        # Eval on the CPU: MixNet's split convolutions go to the CPU kernels as their parts'
        # own weights (which pack them without a dense copy: ~12% of a batch-1 mixnet_s
        # forward went to building the block-diagonal and zero-padded weights, ad-hoc); the
        # public op and the other backends take the dense weights (_dense_weight). split: the
        # roles' parts, found once per call.
        split = {}
        if not bn.training and x.device.type == "cpu":
            split = {r: w for r in _CONV_ROLES
                     if (w := _weight_parts(r, parts.get(r))) is not None}

        def stage(conv_role, bn_role, split):
            conv = parts.get(conv_role)
            if conv is None:
                return []
            bn = parts[bn_role]
            # Training: bn_args counts the batch (num_batches_tracked). Eval with running
            # statistics (_fusable): bn_args would return the module's own tensors.
            a = F_.bn_args(bn) if bn.training else bn
            weights = split.get(conv_role) or [self._dense_weight(conv_role, conv)]
            return [*(F_.cast(w, dtype) for w in weights), a.weight, a.bias, a.running_mean,
                    a.running_var]

        def arguments(split):
            expand = stage("expand_conv", "expand_bn", split)
            depthwise = stage("dw_conv", "dw_bn", split)
            project = stage("project_conv", "project_bn", split)
            se = []
            if "se_reduce" in parts:
                r, e = parts["se_reduce"], parts["se_expand"]
                se = [F_.cast(t, dtype) for t in (r.weight, r.bias, e.weight, e.bias)]
            return (expand, depthwise, se, project, dw.stride[0], dw.dilation[0], self.act,
                    self.se_act, self.se_gate, self.skip, bn.eps)

        args = arguments(split)
        expand, depthwise, se, project = args[:4]
        # A replay passes these lists again: only an eval call without per-call casts (F_.cast
        # copies the conv weights and the SE tensors when their dtype differs) is replayable.
        weights = [t for stage in (expand, depthwise, project) for t in stage[:-4]] + se
        replayable = (not bn.training and x.dtype == dtype
                      and all(t.dtype == dtype for t in weights))
        if self._packed_cache is not None and not bn.training:
            out = ops._prepacked_block(self._packed_cache, F_.cast(x, dtype), *args)
            if out is not None:
                if replayable:
                    entry = self._packed_cache["entry"]
                    self._packed_cache["replay"] = _Replay(self, parts, dtype, args,
                                                           (entry[3], entry[4]))
                return out
        if split:
            out = None
            if ops._takes_inference_kernel(x, dtype, args):
                try:
                    out = ops._inference_call(x, args)
                except Exception:  # noqa: BLE001 - the dense weights' call raises the checked error
                    out = None
            if out is not None:
                if replayable and self._packed_cache is None:
                    # The parts' weights are the modules' own tensors, read as they are then.
                    self.__dict__["_replay"] = _Replay(self, parts, dtype, args, None)
                return out
            args = arguments({})
            expand, depthwise, se, project = args[:4]
        # _fusable: running statistics kept and momentum set, so bn_args would pass these.
        out = ops.inverted_residual(F_.cast(x, dtype), expand, depthwise, se, project,
                                    stride=dw.stride[0], dilation=dw.dilation[0], act=self.act,
                                    se_act=self.se_act, se_gate=self.se_gate, skip=self.skip,
                                    training=bn.training, momentum=bn.momentum, eps=bn.eps)
        if (replayable and self._packed_cache is None and not torch.is_grad_enabled()
                and all(_own_weight(role, parts.get(role)) for role in _CONV_ROLES)
                and ops._takes_inference_kernel(x, dtype, args)):
            # The next call with nothing changed replays this one (the conv weights are the
            # modules' own tensors, read as they are then; MixNet's built ones are not kept).
            self.__dict__["_replay"] = _Replay(self, parts, dtype, args, None)
        return out

    def _dense_weight(self, role: str, conv: nn.Module) -> torch.Tensor:
        """The weight the fused op takes for a conv role: the conv's own, or for a split or
        grouped conv (MixNet) the block-diagonal 1x1 / zero-padded depthwise weight built from
        its parts (on the CPU in eval a split conv's parts go to the kernel as they are,
        _weight_parts; this serves the other devices and grouped convs). In a prepacked block
        (prepack_for_inference) without a gradient to record, that is built once and kept while
        the parts' weights are the same tensors at the same versions, so that the packed weights
        are reused; with prepack's caveat: writes through `.data` are not seen. Elsewhere it is
        built on every call."""
        if _own_weight(role, conv):
            return conv.weight
        build = F_.depthwise_weight if role == "dw_conv" else F_.pointwise_weight
        sources = [c.weight for c in F_.convs(conv)]
        if (self._packed_cache is None or not ops._plain_context()
                or torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return build(conv)
        versions = [t._version for t in sources]
        cache = self.__dict__.setdefault("_dense_weights", {})
        hit = cache.get(role)
        if (hit is not None and len(hit[0]) == len(sources)
                and all(a is b for a, b in zip(hit[0], sources)) and hit[1] == versions):
            return hit[2]
        # A plain tensor even under inference_mode (an inference tensor has no version
        # counter for the prepacked block's checks).
        with torch.inference_mode(False), torch.no_grad():
            weight = build(conv)
        cache[role] = (sources, versions, weight)
        return weight

    def extra_repr(self) -> str:
        parts = [f"act={self.act!r}", f"skip={self.skip}"]
        if "se_reduce" in self._roles:
            parts += [f"se_act={self.se_act!r}", f"se_gate={self.se_gate!r}"]
        if self.project_act != "identity":
            parts.append(f"project_act={self.project_act!r}")
        if self.same:
            parts.append("padding='same'")
        return ", ".join(parts)


class _State:
    """What a replayed call was built from, as flat lists compared with C-level maps (a Python
    loop over them was ~14 us per call, half a small block's time at batch 1): (dict, key,
    object) entries that must be identical, (object, attribute, value) settings, tensors at
    their version counters, and (container, length) sizes (hook dicts empty, child dicts)."""

    def _keep(self, same: list, settings: list, tensors: list, sized: list = ()) -> None:
        # A setting held in its object's __dict__ (most: eps, training, stride, ...) is kept as
        # an identity entry of that dict: one lookup instead of getattr's walk through the
        # type's MRO, the larger part of the check's cache misses after a forward. Identity
        # is the stricter test (an equal new value rebuilds the replay once).
        in_dict = [_instance_attr(o, a) for o, a in settings]
        same = list(same) + [(vars(o), a, vars(o)[a]) for (o, a), d in zip(settings, in_dict) if d]
        settings = [s for s, d in zip(settings, in_dict) if not d]
        self.same_in, self.same_key, self.same_obj = _columns(same, 3)
        self.set_obj, self.set_attr = _columns(settings, 2)
        self.set_value = list(map(getattr, self.set_obj, self.set_attr))
        self.tensors = tensors
        self.versions = list(map(_VERSION, tensors))
        self.sized, self.sizes = _columns(sized, 2)

    def unchanged(self) -> bool:
        """Nothing this replay was built from has changed (modules, settings, tensors): the
        compiled library's loop over the lists (csrc/python_module.cpp; after a forward has
        streamed the weights through the caches, these Python expressions were ~6% of a
        prepacked batch-1 forward), else the expressions."""
        if _UNCHANGED is not None:
            return _UNCHANGED(self.same_in, self.same_key, self.same_obj, self.set_obj,
                              self.set_attr, self.set_value, self.tensors, self.versions,
                              self.sized, self.sizes)
        return (all(map(operator.is_, map(dict.get, self.same_in, self.same_key), self.same_obj))
                and list(map(getattr, self.set_obj, self.set_attr)) == self.set_value
                and list(map(_VERSION, self.tensors)) == self.versions
                and list(map(len, self.sized)) == self.sizes)


def _columns(rows: list, n: int) -> list:
    """The n columns of a list of n-tuples, as lists (n empty lists for no rows)."""
    return [list(c) for c in zip(*rows)] if rows else [[] for _ in range(n)]


def _instance_attr(obj, attr: str) -> bool:
    """getattr(obj, attr) is obj.__dict__[attr]: there, and no data descriptor (property,
    slot) of obj's type overrides it."""
    if attr not in getattr(obj, "__dict__", ()):
        return False
    d = getattr(type(obj), attr, None)
    return not (hasattr(type(d), "__set__") or hasattr(type(d), "__delete__"))


_UNCHANGED = getattr(_extension._C, "unchanged", None)
_profiler_enabled = torch._C._autograd._profiler_enabled


_TENSORS = ("weight", "bias", "running_mean", "running_var")
# The settings of a conv + BN pair that a replayed packed call was built from.
_CONV_SETTINGS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_BN_SETTINGS = ("training", "eps", "track_running_stats")


def _tensor_entries(modules) -> Tuple[list, list]:
    """(owner dict, name, tensor) of the weights, biases and BN statistics of `modules`, and
    those tensors."""
    same, tensors = [], []
    for m in modules:
        for owner in (m._parameters, m._buffers):
            for name in _TENSORS:
                t = owner.get(name)
                if t is not None:
                    same.append((owner, name, t))
                    tensors.append(t)
    return same, tensors


class _Replay(_State):
    """A block's last fused eval-mode call on the CPU (prepacked: cache["replay"], from its
    packed weights; else _Block._replay, whose conv weights are the modules' own tensors, read
    live), replayed while nothing it was built from has changed:
    the Python of a block call (child lookups, the fusability checks, the argument lists:
    ~35 us, 15% of a 7x7 block at batch 1) reduced to identity and version checks. Replayed
    only with the same child modules under every role, the block and its BatchNorms in eval
    mode with the same eps, the same activation/stride/dilation settings, the same tensor
    objects (conv weights and biases, BN affine and running statistics) at the same versions,
    and a plain CPU tensor x of the same dtype with no gradient, autocast, compiler, dispatch
    mode or other backend active; None otherwise (the full forward runs and rebuilds it)."""

    def __init__(self, block: "_Block", parts: Dict[str, nn.Module], dtype: torch.dtype,
                 args: tuple, packed: Optional[tuple]):
        # Identical: each role's module along its path from the block, every child of the
        # parts (MixNet's split convolutions), every tensor the call reads (conv weights and
        # biases, BN affine and running statistics); settings: the block's, its BNs' and the
        # depthwise conv's.
        same = []
        for role, path in block._roles.items():
            m = block
            for name in path:
                same.append((m._modules, name, m._modules.get(name)))
                m = m._modules.get(name)
        same += [(m._modules, name, child) for part in parts.values()
                 for m in part.modules() for name, child in m._modules.items()]
        tensor_same, tensors = _tensor_entries(m for part in parts.values()
                                               for m in part.modules())
        settings = [(block, "training")] + [
            (block, a) for a in ("act", "se_act", "se_gate", "project_act", "skip", "same")]
        settings += [(m, a) for role, m in parts.items() if role.endswith("_bn")
                     for a in ("training", "eps")]
        settings += [(c, a) for c in F_.convs(parts["dw_conv"])
                     for a in ("stride", "dilation", "padding")]
        drop = parts.get("drop_path")
        if drop is not None:
            settings += [(drop, a) for a in ("training", "drop_prob", "p") if hasattr(drop, a)]
        self._keep(same + tensor_same, settings, tensors)
        self.dtype, self.args, self.packed = dtype, args, packed

    def __call__(self, block: "_Block", x: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return self._replay(block, x)
        except Exception:  # noqa: BLE001 - the full forward raises the checked error
            return None

    def _replay(self, block: "_Block", x: torch.Tensor) -> Optional[torch.Tensor]:
        if not _replayable_input(x, self.dtype) or not self.unchanged():
            return None
        if self.packed is None:
            return ops._inference_call(x, self.args)
        return ops._packed_call(x, *self.packed)

    def chain_step(self) -> Optional[tuple]:
        """(op, packed, args) for _ChainReplay: the packed call; None when not prepacked."""
        if self.packed is None:
            return None
        return ops._cpp().inverted_residual_packed.default, self.packed[0], self.packed[1]


class _PointwiseReplay(_State):
    """A prepacked ConvBnActBlock's 1x1 conv + BN + act (no skip) in a _ChainReplay: its packed
    call (ops._prepacked_pointwise's cache entry) while the conv and BN are the same modules
    with the same settings, tensors and versions as when that entry was packed."""

    @classmethod
    def of(cls, block: "ConvBnActBlock") -> Optional["_PointwiseReplay"]:
        conv, bn = block._modules.get("conv"), block._modules.get("bn1")
        entry = block._packed_cache.get("entry")
        if (block.has_skip or type(conv) is not nn.Conv2d
                or type(bn) is not nn.BatchNorm2d or bn.training
                or conv.kernel_size != (1, 1) or conv.stride != (1, 1)
                or conv.padding != (0, 0) or conv.bias is not None):
            return None
        tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        if not ops._pack_current(entry, (conv.weight.dtype, bn.eps), tensors):
            return None
        step = cls()
        tensor_same, tensors = _tensor_entries((conv, bn))
        settings = [(block, a) for a in ("training", "act", "has_skip", "same")]
        settings += [(bn, a) for a in _BN_SETTINGS] + [(conv, a) for a in _CONV_SETTINGS]
        step._keep([(block._modules, "conv", conv), (block._modules, "bn1", bn)] + tensor_same
                   + [(conv._parameters, "bias", None)], settings, tensors)
        step.dtype = conv.weight.dtype
        step.step = (ops._cpp().pwconv_bn_act_packed.default, entry[3],
                     (conv.out_channels, block.act, None))
        return step

    def chain_step(self) -> tuple:
        return self.step


class _StemReplay(_State):
    """A model's stem (conv_stem + bn1 + act) in a _ChainReplay: what it was built from (a
    change makes the chain build again), and whether it is `fused` with the chain's first
    block, a prepacked block without an expand stage, into one
    effkernels::stem_inverted_residual_packed call: the stem's output rows computed into the
    block's ring and never stored (at batch 1 the models' largest tensor). Fused only where the
    stem's own call (F_.conv_bn_act) takes effkernels::conv_bn_act_inference, so that the
    results are the same bits."""

    @classmethod
    def of(cls, owner: nn.Module, x: torch.Tensor, block: nn.Module,
           replay: _State) -> "_StemReplay":
        """owner: the module with conv_stem, bn1, act and same; x: the stem's input in the call
        the chain is built after; block, replay: the chain's first layer and its replay."""
        conv, bn = owner._modules.get("conv_stem"), owner._modules.get("bn1")
        step = cls()
        same = [(owner._modules, "conv_stem", conv), (owner._modules, "bn1", bn)]
        settings = [(owner, a) for a in ("act", "same")]
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
            # Another type of conv or BN: not fused, and the chain built again when the
            # modules are replaced.
            step._keep(same, settings, [])
            step.fused = False
            return step
        tensor_same, tensors = _tensor_entries((conv, bn))
        settings += [(bn, a) for a in _BN_SETTINGS] + [(conv, a) for a in _CONV_SETTINGS]
        step._keep(same + tensor_same + [(conv._parameters, "bias", conv.bias)], settings,
                   tensors)
        act = owner.act
        bnp = None if bn.training else F_.bn_args(bn)  # (which counts batches in training)
        # The stem's own call's branch (F_.dense: foldable, direct, the op's operands), then
        # what the fused op adds: no dilation, a first block without expand stage.
        step.fused = (
                bnp is not None and isinstance(block, _Block) and not owner.same
                and replay.dtype is torch.float32
                and conv.dilation == (1, 1) and conv.kernel_size != (1, 1)
                and "expand_conv" not in block._roles
                and not (block.skip and "se_reduce" in block._roles)
                and F_._foldable(x, conv, bnp, act) and F_._direct_conv(conv, bnp, conv.padding)
                and bn.running_var is not None
                and ops._takes_conv_inference(x, conv.weight, conv.bias, tuple(bnp[:4])))
        if step.fused:
            step.args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                         bn.running_var, list(conv.stride), list(conv.padding), bn.eps, act)
        return step


def run_stem(owner: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """owner's stem (conv_stem + bn1 + owner.act, TF 'SAME' padding when owner.same) on x;
    x itself without an owner."""
    if owner is None:
        return x
    return F_.conv_bn_act(x, owner.conv_stem, owner.bn1, owner.act, owner.same)


def _replayable_input(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """x is a plain CPU tensor of `dtype` that the CPU kernels serve below Autograd (no
    autocast, compiler, dispatch mode or transform, the cpu backend selected)."""
    return (type(x) is torch.Tensor and x.dtype is dtype and x.is_cpu
            and not torch.is_autocast_enabled("cpu")
            and ops._plain_context() and ops._resolve(x, "inverted_residual") == "cpu")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple(f"_global{name}" for name in _HOOK_DICTS)


def _hook_dicts(owner, names) -> Tuple[list, list]:
    """(owner's __dict__, name, dict) entries of owner's hook dicts `names`, and the dicts:
    identical and empty while a replay holds (nn.modules.module's global hooks, or a
    module's own)."""
    dicts = [vars(owner)[name] for name in names]
    return [(vars(owner), name, d) for name, d in zip(names, dicts)], dicts


class _ChainReplay(_State):
    """The prepacked layers of a (nested) nn.Sequential replayed as one call: their packed
    kernels one after the other (blocks: _Replay; ConvBnActBlocks: _PointwiseReplay), with all
    their checks done once over lists of all of them, and that none of the containers or layers
    has a hook, another type, an own `forward` or other children; no module calls. At batch 1
    the module calls and per-block checks cost ~20 us per block, and the gaps between kernels
    let the OpenMP threads fall asleep. Built after a call of the Sequential in which every
    layer took its packed path (run_sequential); None when any layer differs."""

    def __init__(self, containers: list, layers: list, replays: list,
                 stem_owner: Optional[nn.Module] = None, stem: Optional[_StemReplay] = None):
        modules = containers + layers
        self.dtype = replays[0].dtype
        # No global hook; every module of the same type, without hooks or an own `forward`;
        # the containers with the same children; then the replays' lists (build checked them
        # unchanged). All in one list per kind, for _State.unchanged's one C loop.
        same, hooks = _hook_dicts(nn.modules.module, _GLOBAL_HOOK_DICTS)
        settings = [(m, "__class__") for m in modules]
        for m in modules:
            hook_same, own_hooks = _hook_dicts(m, _HOOK_DICTS)
            same += hook_same + [(vars(m), "forward", None), (vars(m), "_modules", m._modules)]
            hooks += own_hooks
        sized = [(d, 0) for d in hooks] + [(c._modules, len(c._modules)) for c in containers]
        same += [(c._modules, name, child) for c in containers
                 for name, child in c._modules.items()]
        same += [e for r in replays for e in zip(r.same_in, r.same_key, r.same_obj)]
        settings += [s for r in replays for s in zip(r.set_obj, r.set_attr)]
        tensors = [t for r in replays for t in r.tensors]
        if stem is not None:
            same += list(zip(stem.same_in, stem.same_key, stem.same_obj))
            settings += list(zip(stem.set_obj, stem.set_attr))
            tensors += stem.tensors
        self._keep(same, settings, tensors, sized)
        self.hook_dicts = hooks
        self.steps = [(op.redispatch, packed, args)
                      for op, packed, args in (r.chain_step() for r in replays)]
        # With the stem of stem_owner (run_sequential's): fused with the first block, the chain
        # takes the stem's input; else the stem's output (the caller runs the stem).
        self.stem_owner = stem_owner
        self.stem_fused = stem is not None and stem.fused
        if self.stem_fused:
            _, packed, args = self.steps[0]
            self.steps[0] = (ops._cpp().stem_inverted_residual_packed.default.redispatch,
                             packed, (*args, *stem.args))

    @classmethod
    def build(cls, seq: nn.Sequential, stem_owner: Optional[nn.Module] = None,
              x: Optional[torch.Tensor] = None) -> Optional["_ChainReplay"]:
        """stem_owner: run_sequential's stem; x: its input in the call just made."""
        containers, layers, replays = [], [], []
        pending = [seq]
        while pending:
            m = pending.pop()
            if type(m) is nn.Sequential:
                containers.append(m)
                pending.extend(reversed(list(m._modules.values())))
                continue
            cache = getattr(m, "_packed_cache", None)
            if cache is None:
                return None
            if isinstance(m, _Block):
                replay = cache.get("replay")
            elif type(m) is ConvBnActBlock:
                replay = _PointwiseReplay.of(m)
            else:
                return None
            if (replay is None or replay.chain_step() is None
                    or replay.dtype is not (replays[0] if replays else replay).dtype
                    or not replay.unchanged()):
                return None
            layers.append(m)
            replays.append(replay)
        if not replays:
            return None
        stem = None if stem_owner is None else _StemReplay.of(stem_owner, x, layers[0],
                                                               replays[0])
        return cls(containers, layers, replays, stem_owner, stem)

    def hooked(self) -> bool:
        """A hook is registered on a module it checks, or globally: while one is, the layers
        are called, and the chain is kept for when none is rather than built again after each
        call (~350 us at batch 1)."""
        return any(map(len, self.hook_dicts))

    def __call__(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            # (_replayable_input's backend check covers the fused stem too: the backend that
            # serves the pointwise op serves the stem, and for CPU tensors it is the same for
            # every op.)
            if (not _replayable_input(x, self.dtype) or _profiler_enabled()
                    or not self.unchanged()):
                return None
            key = ops._kernel_key("cpu")
            for call, packed, args in self.steps:
                x = call(key, x, packed, *args)
            return x
        except Exception:  # noqa: BLE001 - the Sequential's call raises the checked error
            return None


def run_sequential(seq: nn.Sequential, x: torch.Tensor, cache: Optional[dict],
                   stem: Optional[nn.Module] = None) -> torch.Tensor:
    """seq(run_stem(stem, x)); with `cache` (a prepacked model's dict) and no gradient, through
    the chained replay of its blocks (_ChainReplay, kept in cache["chain"]) where it applies,
    the stem fused with the first block where it can be (_StemReplay). stem: a module with
    conv_stem, bn1, act and same (effkernels.models' networks), or None."""
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return seq(run_stem(stem, x))
    chain = cache.get("chain")
    if chain is not None and chain.stem_owner is not stem:
        chain = None  # built for another stem
    if chain is not None and chain.stem_fused:
        out = chain(x)
        if out is not None:
            return out
    h = run_stem(stem, x)
    if chain is not None and not chain.stem_fused:
        out = chain(h)
        if out is not None:
            return out
    out = seq(h)
    if chain is None or not chain.hooked():
        cache["chain"] = _ChainReplay.build(seq, stem, x)
    return out


def prepack_for_inference(model: nn.Module, enabled: bool = True) -> int:
    """Lets the inverted-residual blocks of `model` (InvertedResidual, MBConv,
    DepthwiseSeparable, also those effkernels.convert swapped in) keep their eval-mode weights
    packed for the CPU kernel (BatchNorm folded, GEMM panels for this CPU and the input's dtype)
    instead of packing them on every call, as ONNX Runtime and oneDNN prepack at session
    creation; so do the 1x1 conv + BN layers of ConvBnActBlock and of the models' heads
    (effkernels::pwconv_bn_act_pack). Only CPU inference uses them (eval mode, no gradient
    recorded, no compiler); results are bit-for-bit those of the unpacked call. A module packs
    again at its next call when one of its weights or BatchNorm statistics is replaced or
    changed in place through PyTorch (version counter); writes that bypass it (`.data`, numpy
    views) are not seen: call this again after those. In effkernels.models, the model's blocks
    then run as one chained replay (_ChainReplay: their packed kernels back to back, no module
    calls; the stem fused with a first block that has no expand stage, _StemReplay) while
    nothing they were built from changes and no hook is registered. The packed
    copies cost about the weights' size in memory; enabled=False drops them. Returns the number
    of modules set (blocks, ConvBnActBlocks, heads)."""
    count = 0
    for module in model.modules():
        if isinstance(module, _Block) or "_packed_cache" in type(module).__dict__:
            module._packed_cache = {} if enabled else None
            module.__dict__.pop("_dense_weights", None)  # MixNet's kept built weights
            count += 1
    return count


def _bn_factory(norm_layer, eps: float, momentum: float, factory: dict):
    if norm_layer is None:
        return lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum, **factory)
    return norm_layer


class InvertedResidual(_Block):
    """Drop-in for torchvision.models.mobilenetv2.InvertedResidual: the same constructor, the
    same state_dict keys (conv.0.0 = expand conv, ... as torchvision), the same outputs.

    Options beyond torchvision's, for the other families: kernel_size (a list = MixConv over
    equal channel groups), dilation, act, se_ratio (SE on the hidden channels with
    make_divisible(hidden * se_ratio) reduced channels, inserted after the depthwise stage),
    se_act, se_gate, skip (None: stride 1 and inp == oup, as torchvision).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float,
                 norm_layer=None, *, kernel_size: Kernel = 3, dilation: int = 1,
                 act: str = "relu6", se_ratio: float = 0.0, se_act: str = "relu",
                 se_gate: str = "sigmoid", skip: Optional[bool] = None, device=None,
                 dtype=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        factory = dict(device=device, dtype=dtype)
        bn = _bn_factory(norm_layer, 1e-5, 0.1, factory)
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = (stride == 1 and inp == oup) if skip is None else bool(skip)
        self.out_channels = oup
        self._is_cn = stride > 1
        layers, roles = [], {}
        if expand_ratio != 1:
            roles.update(expand_conv=("conv", "0", "0"), expand_bn=("conv", "0", "1"))
            layers.append(nn.Sequential(make_conv(inp, hidden, 1, **factory), bn(hidden),
                                        nn.ReLU6()))
        i = str(len(layers))
        roles.update(dw_conv=("conv", i, "0"), dw_bn=("conv", i, "1"))
        layers.append(nn.Sequential(make_conv(hidden, hidden, kernel_size, stride, dilation,
                                              depthwise=True, **factory), bn(hidden),
                                    nn.ReLU6()))
        if se_ratio:
            i = str(len(layers))
            roles.update(se_reduce=("conv", i, "conv_reduce"), se_expand=("conv", i,
                                                                          "conv_expand"))
            layers.append(SqueezeExcite(hidden, make_divisible(hidden * se_ratio), se_act,
                                        se_gate, **factory))
        i = len(layers)
        roles.update(project_conv=("conv", str(i)), project_bn=("conv", str(i + 1)))
        layers += [make_conv(hidden, oup, 1, **factory), bn(oup)]
        self.conv = nn.Sequential(*layers)
        self._setup(roles, act=act, skip=self.use_res_connect, se_act=se_act, se_gate=se_gate)


class MBConv(_Block):
    """timm's InvertedResidual layout (conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3): the block
    of effkernels.models. Kernel arguments may be lists (MixNet: split convolutions)."""

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, *, dw_kernel_size: Kernel = 3,
                 exp_kernel_size: Kernel = 1, pw_kernel_size: Kernel = 1, stride: int = 1,
                 dilation: int = 1, act: str = "relu6", rd_channels: int = 0,
                 se_act: str = "relu", se_gate: str = "sigmoid", noskip: bool = False,
                 same: bool = False, eps: float = 1e-5, momentum: float = 0.1,
                 drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv_pw = make_conv(in_chs, mid_chs, exp_kernel_size, **factory)
        self.bn1 = nn.BatchNorm2d(mid_chs, eps=eps, momentum=momentum, **factory)
        self.conv_dw = make_conv(mid_chs, mid_chs, dw_kernel_size, stride, dilation,
                                 depthwise=True, **factory)
        self.bn2 = nn.BatchNorm2d(mid_chs, eps=eps, momentum=momentum, **factory)
        self.se = SqueezeExcite(mid_chs, rd_channels, se_act, se_gate, **factory) \
            if rd_channels else nn.Identity()
        self.conv_pwl = make_conv(mid_chs, out_chs, pw_kernel_size, **factory)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=eps, momentum=momentum, **factory)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()
        roles = dict(expand_conv=("conv_pw",), expand_bn=("bn1",), dw_conv=("conv_dw",),
                     dw_bn=("bn2",), project_conv=("conv_pwl",), project_bn=("bn3",),
                     drop_path=("drop_path",) if drop_path_rate else None)
        if rd_channels:
            roles.update(se_reduce=("se", "conv_reduce"), se_expand=("se", "conv_expand"))
        self._setup(roles, act=act, skip=stride == 1 and in_chs == out_chs and not noskip,
                    se_act=se_act, se_gate=se_gate, same=same and stride > 1)


class DepthwiseSeparable(_Block):
    """MobileNetV1's block, timm's DepthwiseSeparableConv layout (conv_dw, bn1, se, conv_pw,
    bn2): depthwise kxk+BN+act -> [SE] -> 1x1+BN[+act (pw_act, MobileNetV1)] -> [+ x]."""

    def __init__(self, in_chs: int, out_chs: int, *, dw_kernel_size: Kernel = 3,
                 pw_kernel_size: Kernel = 1, stride: int = 1, dilation: int = 1,
                 act: str = "relu6", pw_act: bool = False, rd_channels: int = 0,
                 se_act: str = "relu", se_gate: str = "sigmoid", noskip: bool = False,
                 same: bool = False, eps: float = 1e-5, momentum: float = 0.1,
                 drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv_dw = make_conv(in_chs, in_chs, dw_kernel_size, stride, dilation,
                                 depthwise=True, **factory)
        self.bn1 = nn.BatchNorm2d(in_chs, eps=eps, momentum=momentum, **factory)
        self.se = SqueezeExcite(in_chs, rd_channels, se_act, se_gate, **factory) \
            if rd_channels else nn.Identity()
        self.conv_pw = make_conv(in_chs, out_chs, pw_kernel_size, **factory)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=eps, momentum=momentum, **factory)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()
        roles = dict(dw_conv=("conv_dw",), dw_bn=("bn1",), project_conv=("conv_pw",),
                     project_bn=("bn2",), drop_path=("drop_path",) if drop_path_rate else None)
        if rd_channels:
            roles.update(se_reduce=("se", "conv_reduce"), se_expand=("se", "conv_expand"))
        self._setup(roles, act=act, skip=stride == 1 and in_chs == out_chs and not noskip,
                    se_act=se_act, se_gate=se_gate, project_act=act if pw_act else "identity",
                    same=same and stride > 1)


class ConvBnActBlock(InferenceCaches, NotScriptable, nn.Module):
    """timm's ConvBnAct block layout (conv, bn1): conv + BN + act [+ x]."""

    # prepack_for_inference: the packed eval-mode weights of a 1x1 conv (ops.
    # _prepacked_pointwise's cache); None: packed per call.
    _packed_cache: Optional[dict] = None

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 dilation: int = 1, act: str = "relu6", *, skip: bool = False,
                 same: bool = False, eps: float = 1e-5, momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv = make_conv(in_chs, out_chs, kernel_size, stride, dilation, **factory)
        self.bn1 = nn.BatchNorm2d(out_chs, eps=eps, momentum=momentum, **factory)
        self.act = _check_act("act", act)
        self.has_skip = skip and stride == 1 and in_chs == out_chs
        self.same = same and stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.conv_bn_act(x, self.conv, self.bn1, self.act, self.same,
                              residual=x if self.has_skip else None,
                              packed_cache=self._packed_cache)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, skip={self.has_skip}"
