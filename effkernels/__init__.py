"""effkernels: fused kernels for efficient CNNs (depthwise-separable convs, inverted residuals,
MixConv, squeeze-excite) behind PyTorch's dispatcher, with autograd and torch.compile support.

    import effkernels
    effkernels.available_backends("cpu")    # {"cpu": "available", "cuda": "<why not>", ...}
    effkernels.cpu_isa()                    # the CPU kernels' instruction set here, e.g. "amx"
    with effkernels.backend("reference"):   # or effkernels.set_backend(...)
        y = effkernels.ops.dwconv_bn_act(x, w, g, b, rm, rv, act="relu6")
"""
from . import _extension
from ._extension import cpu_isa
from ._backend import available_backends, backend, get_backend, set_backend
from . import ops, reference
from ._convert import convert
from .profile import Profile, profile

if _extension.loaded():
    from . import _registration

    _registration.register("effkernels")  # fake kernels and autograd for the C++ ops

__version__ = "0.1.0"
__all__ = ["ops", "reference", "convert", "profile", "Profile", "available_backends", "backend", "get_backend", "set_backend",
           "cpu_isa", "extension_error"]


def extension_error():
    """Why effkernels._C is not loaded (None when it is)."""
    return _extension.load_error
