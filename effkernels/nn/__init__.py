"""effkernels.nn: modules whose forward runs the effkernels ops on the active backend, with
their parameters in ordinary nn.Conv2d / nn.BatchNorm2d children (state_dicts of torchvision
and timm load into them). They train (BatchNorm batch statistics and running averages as
nn.BatchNorm2d, autograd), evaluate, follow .to(dtype/device/memory_format), torch.autocast,
deepcopy and pickle, and run under torch.compile(fullgraph=True)."""
from .blocks import (ConvBnActBlock, DepthwiseSeparable, InvertedResidual, MBConv,
                     prepack_for_inference)
from .modules import (ConvBNAct, DepthwiseConvBNAct, DropPath, MixedDepthwiseConvBNAct,
                      PointwiseConvBNAct, SqueezeExcite, make_conv, split_channels)

__all__ = ["InvertedResidual", "MBConv", "DepthwiseSeparable", "ConvBnActBlock", "ConvBNAct",
           "DepthwiseConvBNAct", "PointwiseConvBNAct", "MixedDepthwiseConvBNAct",
           "SqueezeExcite", "DropPath", "make_conv", "split_channels", "prepack_for_inference"]
