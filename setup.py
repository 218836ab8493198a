"""Builds effkernels._C: a CUDA extension when torch is a CUDA build and a CUDA toolkit is found,
a C++-only one otherwise. Switches (environment):

  EFFK_BUILD_CUDA=auto|0|1   auto (default): CUDA iff torch.version.cuda is set and a toolkit
                             (CUDA_HOME with bin/nvcc) is found; 1: require CUDA (error
                             otherwise); 0: never.
  TORCH_CUDA_ARCH_LIST       e.g. "8.0;9.0" (the default when unset).
  MAX_JOBS                   parallel compile jobs (ninja).
  EFFK_NO_EXTENSION=1        install the Python package only (the Makefile builds in place).
  EFFK_DEBUG=1               -O0 -g host code.

Decided from the torch build and the toolkit, never from torch.cuda.is_available(): a GPU-less
machine still compiles the CUDA sources.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def read_sources():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def find_nvcc(cuda_home):
    """The toolkit's nvcc under cuda_home, or None. torch takes CUDA_HOME/CUDA_PATH as set, even
    when the directory does not exist or holds no toolkit, so the build checks for nvcc itself."""
    if cuda_home is None:
        return None
    for name in ("nvcc", "nvcc.exe"):
        nvcc = os.path.join(cuda_home, "bin", name)
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            return nvcc
    return None


def resolve_cuda(torch_cuda_version, cuda_home):
    """(build the CUDA kernels?, why) from the torch build (torch.version.cuda), the toolkit
    (cpp_extension.CUDA_HOME) and EFFK_BUILD_CUDA; never from whether a GPU is present."""
    mode = os.environ.get("EFFK_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"effkernels setup: EFFK_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    if torch_cuda_version is None:
        why_not = "torch is a CPU-only build (torch.version.cuda is None)"
    elif cuda_home is None:
        why_not = ("no CUDA toolkit found (CUDA_HOME/CUDA_PATH unset, no nvcc on PATH, no "
                   "/usr/local/cuda)")
    elif find_nvcc(cuda_home) is None:
        why_not = f"no CUDA toolkit at CUDA_HOME={cuda_home} (no bin/nvcc there)"
    else:
        why_not = None
    if mode == "1" and why_not is not None:
        sys.exit(f"effkernels setup: EFFK_BUILD_CUDA=1 but {why_not}")
    if mode == "0":
        return False, "disabled by EFFK_BUILD_CUDA=0"
    if why_not is not None:
        return False, why_not
    return True, f"torch CUDA {torch_cuda_version}, toolkit at {cuda_home}"


def make_extensions():
    import torch
    from torch.utils import cpp_extension

    with_cuda, why = resolve_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    debug = os.environ.get("EFFK_DEBUG") == "1"

    sources = [s for s in read_sources() if with_cuda or not s.endswith(".cu")]
    sources.append("csrc/python_module.cpp")

    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march=native: a wheel must run on any x86-64. Hot CPU loops pick their ISA at run time.
    cxx = opt + ["-std=c++20", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v"]
    macros = [("EFFK_WITH_CUDA", None)] if with_cuda else []
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind(
        name="effkernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    print("effkernels build settings:")
    print(f"  torch           {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA backend    {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        print(f"  arch list       {os.environ['TORCH_CUDA_ARCH_LIST']}")
    print(f"  MAX_JOBS        {os.environ.get('MAX_JOBS', '(torch default)')}")
    print(f"  host flags      {' '.join(cxx)}")
    print(f"  sources         {len(sources)} ({sum(s.endswith('.cu') for s in sources)} CUDA)")
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


if os.environ.get("EFFK_NO_EXTENSION") == "1":  # register the package only (see Makefile)
    ext_modules, build_ext = [], None
else:
    ext_modules, build_ext = make_extensions()

setup(
    name="effkernels",
    version="0.1.0",
    description="Fused CPU/CUDA/Triton kernels for efficient CNNs (MobileNet, MixNet, EfficientNet)",
    python_requires=">=3.9",
    packages=["effkernels", "effkernels.nn", "effkernels.models", "effkernels.triton_kernels"],
    package_dir={"effkernels": "effkernels", "effkernels.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext} if build_ext else {},
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton"], "bench": ["onnx", "onnxruntime", "matplotlib"]},
)
