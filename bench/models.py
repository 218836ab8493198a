"""Model suite: effkernels.models (channels_last input, eager) against the timm model of the
same name with the same weights: PyTorch eager (NCHW and channels_last), torch.compile
(inductor) of timm's channels_last model, ONNX Runtime (CPU, float32, eval) and, with
--compile-ours, torch.compile of ours.

  eval        batch 1 latency and batch 32 throughput (items_per_s), eval mode, no_grad
  train-step  one SGD step: zero_grad, forward, cross-entropy, backward, optimizer.step

Verified first against timm's model in float32, NCHW (eval: logits; train-step: logits and the
gradients of conv_stem.weight and classifier.weight), with PyTorch's own channels_last result
as the measure of rounding noise.
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from . import harness
from .blocks import randomize_bn
from .harness import Built, Case, Impl
from effkernels.nn import prepack_for_inference

CL = torch.channels_last
MODELS = ("mobilenetv2_100", "mobilenetv3_large_100", "mixnet_s", "efficientnet_b0")
FULL = [("eval", 1), ("eval", 32), ("train-step", 16)]
QUICK_MODELS = ("mobilenetv3_large_100",)
QUICK = [("eval", 1), ("train-step", 2)]
CHECKED = ("conv_stem.weight", "classifier.weight")
# --targets on CPU (issue 7): batch 1 latency and batch 8 throughput, eval, within 1.2x of ONNX
# Runtime and faster than torch.compile.
TARGET_MODELS = ("mobilenetv2_100", "mobilenetv3_large_100", "mixnet_s")
TARGETS = [("eval", 1), ("eval", 8)]


def _models(name: str):
    import timm

    import effkernels.models

    torch.manual_seed(0)
    theirs = randomize_bn(timm.create_model(name, pretrained=False))
    ours = effkernels.models.create_model(name)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _eval_impl(name, model, x, compiles=False) -> Impl:
    fn = harness.compiled(model) if compiles else model
    return harness.fwd_impl(name, fn, [x], compiles=compiles)


def _train_impl(name, model, x, target, compiles=False) -> Impl:
    fn = harness.compiled(model) if compiles else model
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x), target).backward()
        opt.step()

    def result():  # no optimizer step: every implementation is checked at the same weights
        model.zero_grad(set_to_none=True)
        logits = fn(x)
        F.cross_entropy(logits, target).backward()
        return [logits.detach()] + [params[k].grad for k in CHECKED]

    return Impl(name, step, result, setup=result if compiles else None, compiles=compiles)


def model_case(name: str, mode: str, n: int, opts) -> Case:
    def build():
        device, dtype = opts.device, opts.dtype
        train = mode == "train-step"
        theirs, ours = _models(name)
        theirs = theirs.to(device, dtype).train(train)
        ours = ours.to(device, dtype, memory_format=CL).train(train)
        torch.manual_seed(1)
        x = torch.randn(n, 3, 224, 224, device=device).to(dtype)
        x_cl = x.contiguous(memory_format=CL)
        target = torch.randint(0, 1000, (n,), device=device)

        def make(impl_name, model, inp, compiles=False):
            if train:
                return _train_impl(impl_name, model, inp, target, compiles)
            return _eval_impl(impl_name, model, inp, compiles)

        def cl(m):
            return copy.deepcopy(m).to(memory_format=CL)

        impls = [make("eager_nchw", copy.deepcopy(theirs), x), make("eager_cl", cl(theirs), x_cl)]
        skipped = {}
        if opts.compile_budget > 0:
            impls.append(make("compile", cl(theirs), x_cl, compiles=True))
        else:
            skipped["compile"] = "--compile-budget 0 (--quick: model compiles take minutes)"
        if not train and device == "cpu" and dtype == torch.float32 and opts.ort is None:
            impls.append(harness.ort_impl(copy.deepcopy(theirs).eval(), [x]))
        elif not train and device == "cpu":
            skipped["onnxruntime"] = opts.ort or "float32 only"
        impls.append(make(harness.OURS, ours, x_cl))
        if not train and device == "cpu":
            prepacked = copy.deepcopy(ours)
            prepack_for_inference(prepacked)
            impls.append(make(harness.OURS_PREPACKED, prepacked, x_cl))
        if opts.compile_ours:
            impls.append(make(harness.OURS_COMPILE, copy.deepcopy(ours), x_cl, compiles=True))

        ref_model = copy.deepcopy(theirs).float()
        ref_impl = make("reference", ref_model, x.float())

        def ref():
            if train:
                return ref_impl.result()
            with torch.no_grad():
                return [ref_model(x.float())]

        # float32: the reference is eager_nchw itself; PyTorch's channels_last result measures
        # the rounding noise. Lower precision: judged against the float32 model.
        return Built(impls, ref, tol=harness.TOL[dtype] * (100 if train else 10),
                     noise_from="eager_cl" if dtype == torch.float32 else "eager_nchw",
                     skipped=skipped)

    return Case("models", name, "224x224", n, mode, build, items=n)


def cases(opts) -> List[Case]:
    if getattr(opts, "targets", False):
        if opts.device != "cpu":
            return []
        return [model_case(m, mode, n, opts) for m in TARGET_MODELS for mode, n in TARGETS]
    names = QUICK_MODELS if opts.quick and not opts.model else MODELS
    if opts.model:
        names = [m for m in MODELS if any(f in m for f in opts.model.split(","))] or \
            opts.model.split(",")
    plan = QUICK if opts.quick else FULL
    return [model_case(m, mode, n, opts) for m in names for mode, n in plan]
