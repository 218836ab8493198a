"""Build robustness (slow; `make test-slow`): installs without a CUDA toolkit, without Triton and
with a CPU-only torch give a working package with the remaining backends, which says which
backends are missing and why.

A copy of the source tree (the files git tracks plus untracked, not ignored ones; no build
outputs) is installed ONCE with `pip install --no-build-isolation --no-deps --target DIR`, as a
user would, into a directory of its own, and every check then runs the installed package in a
fresh interpreter started in a neutral directory with PYTHONPATH=DIR (never this checkout).

What is simulated, and how:
  a. No CUDA toolkit: CUDA_HOME names a directory that does not exist, CUDA_PATH is unset and
     no directory holding an `nvcc` is on PATH, EFFK_BUILD_CUDA=auto. torch then still reports
     CUDA_HOME (it takes the variable as set), so setup.py must look for bin/nvcc itself. Not
     simulated: a machine without /usr/local/cuda at all with CUDA_HOME unset (torch then
     reports None; that decision is checked directly, test_build_decisions).
  b. No Triton: the interpreter starts with a meta path finder in front that raises
     ModuleNotFoundError("No module named 'triton'") for triton and its submodules, as
     `import triton` does where it is not installed (importlib.util.find_spec raises instead of
     returning None; the package treats both as "not installed"). torch imports with it (it
     probes triton itself). Run against the build of (a), so: neither toolkit nor Triton.
  c. CPU-only torch: this machine has only the CUDA build of torch and no network, so no
     CPU-only wheel can be installed. Simulated: setup.py is run (`setup.py --name`, which
     resolves and prints the build settings without compiling) in an interpreter whose
     torch.version.cuda is set to None before setup.py imports torch, with the real toolkit
     left visible where there is one; it must choose a C++-only build and say why
     (EFFK_BUILD_CUDA=1 must stop with that reason). At run time, the C++-only extension of (a)
     is what a CPU-only torch would get: it must not link any CUDA library (readelf), since a
     CPU-only torch has none, and it runs. Not simulated: compiling against, and loading into,
     a real CPU-only torch (its headers, libraries and torch.cuda._is_compiled() == False).
  d. No extension at all (EFFK_NO_EXTENSION=1, or a missing/broken _C) is covered by
     tests/test_backends.py::test_package_works_without_the_extension and not repeated here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 1800  # seconds; a C++-only build takes minutes on 2 cores


def _copy_source(dst: Path) -> None:
    """The source tree without build outputs: git's files (tracked + untracked not ignored)
    when this is a checkout, else the directories setup.py reads."""
    files = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True)
        if out.returncode == 0:
            files = [f for f in out.stdout.decode().split("\0") if f]
    if files is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "build", "*.egg-info")
        for part in ("csrc", "effkernels", "triton_kernels"):
            shutil.copytree(ROOT / part, dst / part, ignore=ignore)
        shutil.copy2(ROOT / "setup.py", dst / "setup.py")
        return
    for f in files:
        src = ROOT / f
        if src.is_file():  # (a deleted but still tracked file is skipped)
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _base_env(tmp: Path) -> dict:
    """The environment with no effkernels/CUDA switches of the caller's, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EFFK_", "TRITON_", "CUDA_", "PYTHON", "PYTEST_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["TMPDIR"] = str(tmp)
    return env


def _no_toolkit_env(tmp: Path) -> dict:
    """(a): CUDA_HOME a directory that does not exist, no nvcc on PATH."""
    env = _base_env(tmp)
    env["CUDA_HOME"] = str(tmp / "no-cuda-toolkit")
    path = [str(Path(sys.executable).parent)]  # ninja, pip's scripts
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and not (Path(d) / "nvcc").exists() and d not in path:
            path.append(d)
    env["PATH"] = os.pathsep.join(path)
    env["EFFK_BUILD_CUDA"] = "auto"
    env["MAX_JOBS"] = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    return env


@pytest.fixture(scope="module")
def cpp_only_install(tmp_path_factory):
    """pip install of a source copy under (a)'s conditions: (target dir, build log)."""
    tmp = tmp_path_factory.mktemp("install")
    src, target = tmp / "src", tmp / "site"
    _copy_source(src)
    env = _no_toolkit_env(tmp)
    assert shutil.which("nvcc", path=env["PATH"]) is None
    # -O0 (EFFK_DEBUG=1): the same sources and the same no-toolkit decision in ~1/5 of the
    # time (dwconv_bn_act.cpp alone takes 4 min at -O3 on 2 cores). The -O3 compile of these
    # sources is the main build's; what this install checks is the decision, the install and the
    # package running without CUDA.
    env["EFFK_DEBUG"] = "1"
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
           "--no-index", "--no-compile", "--disable-pip-version-check", "--target", str(target),
           str(src)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pip install ran over {BUILD_TIMEOUT}s:\n{(exc.stdout or '')[-4000:]}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pip install failed:\n{log[-6000:]}"
    print(f"\nC++-only pip install: {time.perf_counter() - t0:.0f}s")
    return target, log


# Runs in the fresh interpreter: `import effkernels` from the installed copy, its backend report,
# and every op on the cpu (C++) and reference backends against float64 reference results.
_CHECK = r"""
import json, pathlib, sys
import torch
import effkernels
from effkernels import ops, reference

target = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(effkernels.__file__).resolve().is_relative_to(target), effkernels.__file__
report = {"cpu": effkernels.available_backends("cpu"),
          "cuda": effkernels.available_backends("cuda"),
          "cuda_dw": effkernels.available_backends("cuda", "dwconv_bn_act"),
          "extension_error": effkernels.extension_error(),
          "built_with_cuda": effkernels._extension.built_with_cuda(),
          "cuda_kernels": [op for op in ("dwconv_bn_act", "mixconv_bn_act")
                           if torch._C._dispatch_has_kernel_for_dispatch_key(
                               f"effkernels::{op}", "CUDA")],
          "triton_imported": "triton" in sys.modules}

torch.manual_seed(0)
def bn(c):
    return [torch.rand(c) + 0.5, torch.randn(c) * 0.2, torch.randn(c) * 0.2, torch.rand(c) + 0.5]

def close(a, b, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 1e-4 * max(1.0, b.abs().max().item()), f"{what}: max error {err}"

x = torch.randn(2, 16, 9, 11).contiguous(memory_format=torch.channels_last)
w_dw, w_pw = torch.randn(16, 1, 3, 3) / 3, torch.randn(24, 16, 1, 1) / 4
ws_mix = [torch.randn(8, 1, 3, 3) / 3, torch.randn(8, 1, 5, 5) / 5]
p_dw, p_pw = bn(16), bn(24)
stage = lambda shape: [torch.randn(shape) / shape[1] ** 0.5, *bn(shape[0])]
expand, dwise, project = stage((32, 16, 1, 1)), stage((32, 1, 3, 3)), stage((16, 32, 1, 1))
dwise[0] = dwise[0] / 3

def run(backend):
    leaves = [t.clone().requires_grad_() for t in (x, w_dw, w_pw)]
    with effkernels.backend(backend):
        y = ops.dwconv_bn_act(leaves[0], leaves[1], *p_dw, act="hswish")
        z = ops.pwconv_bn_act(y, leaves[2], *p_pw, act="relu6")
        m = ops.mixconv_bn_act(x, ws_mix, *p_dw, stride=2, act="silu")
        b = ops.inverted_residual(x, expand, dwise, [], project, act="relu6")
    z.sum().backward()
    return [z.detach(), m, b, leaves[0].grad, leaves[1].grad, leaves[2].grad]

d = lambda ts: [t.double() for t in ts]
with torch.no_grad():
    y64 = reference.dwconv_bn_act(x.double(), *d([w_dw, *p_dw]), act="hswish")
    z64 = reference.pwconv_bn_act(y64, *d([w_pw, *p_pw]), act="relu6")
    m64 = reference.mixconv_bn_act(x.double(), d(ws_mix), *d(p_dw), stride=2, act="silu")
    b64 = reference.inverted_residual(x.double(), d(expand), d(dwise), [], d(project),
                                      act="relu6")
ran = {}
for backend in ("cpu", "reference"):
    if report["cpu"][backend] != "available":
        continue
    got = run(backend)
    for name, a, e in zip(("dwconv+pwconv", "mixconv", "inverted_residual"), got, [z64, m64, b64]):
        close(a, e, f"{backend} {name}")
    ran[backend] = got
if "cpu" in ran and "reference" in ran:
    for a, b in zip(ran["cpu"][3:], ran["reference"][3:]):
        close(a, b, "gradient cpu vs reference")
report["ran"] = sorted(ran)
for name in ("cuda", "triton"):
    try:
        with effkernels.backend(name):
            ops.dwconv_bn_act(x, w_dw, *p_dw)
        report[f"{name}_on_cpu_tensor"] = "ran"
    except RuntimeError as e:
        report[f"{name}_on_cpu_tensor"] = str(e)
print("REPORT " + json.dumps(report))
"""

# (b): `import triton` fails as where it is not installed, before anything imports it.
_NO_TRITON = r"""
import sys
class _NoTriton:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTriton)
"""


def _run_installed(target: Path, tmp: Path, *, block_triton=False, env_extra=None) -> dict:
    env = _base_env(tmp)
    env["PYTHONPATH"] = str(target)
    env.update(env_extra or {})
    code = (_NO_TRITON if block_triton else "") + _CHECK
    work = tmp / "cwd"
    work.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert lines, out[-6000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_no_cuda_toolkit_gives_a_cpp_only_build(cpp_only_install, tmp_path):
    """(a): the build says it builds no CUDA kernels and why; the installed package imports,
    runs every op on the cpu backend (matching the float64 reference) and reports the cuda
    backend unavailable with that reason."""
    target, log = cpp_only_install
    assert "CUDA backend    no (no CUDA toolkit at CUDA_HOME=" in log, log[-4000:]
    assert "host flags      -O0 -g" in log, log[-4000:]
    assert list(target.glob("effkernels/_C*.so")) or list(target.glob("effkernels/_C*.pyd"))
    assert (target / "effkernels" / "triton_kernels" / "__init__.py").is_file()
    report = _run_installed(target, tmp_path)
    assert report["extension_error"] is None
    assert report["cpu"]["cpu"] == "available"
    assert report["cpu"]["reference"] == "available"
    assert report["built_with_cuda"] is False and report["cuda_kernels"] == []
    for key in ("cuda", "cuda_dw"):  # the real reason, not "no GPU"
        assert "built without CUDA" in report[key]["cuda"], report[key]
    assert report["ran"] == ["cpu", "reference"]
    assert "cannot run this input" in report["cuda_on_cpu_tensor"]


def test_without_triton(cpp_only_install, tmp_path):
    """(b): with triton not importable the package imports (without trying triton), says
    "triton is not installed" for every device (also with TRITON_INTERPRET=1), refuses an
    explicit triton backend with that reason, and the cpu and reference backends work."""
    target, _ = cpp_only_install
    for extra in ({}, {"TRITON_INTERPRET": "1"}):
        report = _run_installed(target, tmp_path, block_triton=True, env_extra=extra)
        for key in ("cpu", "cuda", "cuda_dw"):
            assert report[key]["triton"].startswith("triton is not installed"), report[key]
        assert report["triton_imported"] is False
        assert report["cpu"]["cpu"] == "available"
        assert report["ran"] == ["cpu", "reference"]
        assert "triton is not installed" in report["triton_on_cpu_tensor"]
        assert "built without CUDA" in report["cuda"]["cuda"]


def _setup_py_decision(src: Path, tmp: Path, *, cpu_only_torch: bool, env_extra: dict):
    """Runs `setup.py --name` (resolves and prints the build settings, compiles nothing), with
    torch.version.cuda = None first when cpu_only_torch."""
    code = textwrap.dedent(f"""
        import runpy, sys
        import torch
        if {cpu_only_torch!r}:
            torch.version.cuda = None   # what a CPU-only torch reports
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
    """)
    env = _base_env(tmp)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    src = tmp_path_factory.mktemp("decision") / "src"
    _copy_source(src)
    return src


@pytest.mark.parametrize("mode", ["auto", "1", "0"])
def test_cpu_only_torch_build_decision(source_copy, tmp_path, mode):
    """(c), the build side: with torch.version.cuda None (and the toolkit visible if this
    machine has one) setup.py resolves to a C++-only build and prints why; EFFK_BUILD_CUDA=1
    stops with that reason instead of failing in the compiler."""
    extra = {"EFFK_BUILD_CUDA": mode}
    cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if Path(cuda, "bin", "nvcc").exists():
        extra["CUDA_HOME"] = cuda
    proc = _setup_py_decision(source_copy, tmp_path, cpu_only_torch=True, env_extra=extra)
    out = proc.stdout + proc.stderr
    if mode == "1":
        assert proc.returncode != 0, out
        assert "EFFK_BUILD_CUDA=1 but torch is a CPU-only build" in out, out
    else:
        assert proc.returncode == 0, out
        why = "torch is a CPU-only build" if mode == "auto" else "disabled by EFFK_BUILD_CUDA=0"
        assert f"CUDA backend    no ({why}" in out, out
        assert "(0 CUDA)" in out, out


@pytest.mark.parametrize("toolkit", ["missing_dir", "unset"])
def test_no_toolkit_build_decision(source_copy, tmp_path, toolkit):
    """(a), the decision alone, for both ways a toolkit can be missing: CUDA_HOME naming no
    toolkit (auto: C++-only with the reason; EFFK_BUILD_CUDA=1: a clear stop), and torch finding
    none (CUDA_HOME None, as on a machine without one: resolve_cuda called directly, since this
    machine may have /usr/local/cuda, which torch falls back to)."""
    if toolkit == "missing_dir":
        env = _no_toolkit_env(tmp_path)
        for mode, ok in (("auto", True), ("1", False)):
            env["EFFK_BUILD_CUDA"] = mode
            proc = _setup_py_decision(source_copy, tmp_path, cpu_only_torch=False, env_extra=env)
            out = proc.stdout + proc.stderr
            assert (proc.returncode == 0) == ok, out
            assert "no CUDA toolkit at CUDA_HOME=" in out, out
            if ok:
                assert "(0 CUDA)" in out, out
        return
    code = textwrap.dedent("""
        import ast, os, sys
        src = open("setup.py").read()
        tree = ast.parse(src)
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                 and n.name in ("find_nvcc", "resolve_cuda")]
        ns = {"os": os, "sys": sys}
        exec(compile(ast.Module(body=funcs, type_ignores=[]), "setup.py", "exec"), ns)
        os.environ["EFFK_BUILD_CUDA"] = "auto"
        print(ns["resolve_cuda"]("13.0", None))
        os.environ["EFFK_BUILD_CUDA"] = "1"
        ns["resolve_cuda"]("13.0", None)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=source_copy, env=_base_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert "(False, 'no CUDA toolkit found" in proc.stdout, out
    assert proc.returncode != 0 and "EFFK_BUILD_CUDA=1 but no CUDA toolkit found" in out, out


def test_cpu_only_torch_runtime(cpp_only_install, tmp_path):
    """(c), the run-time side: the C++-only extension links no CUDA library (a CPU-only torch
    has none: no libtorch_cuda, libc10_cuda, libcudart), and runs (the ops above). Loading it
    into a real CPU-only torch is not simulated."""
    target, _ = cpp_only_install
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found: cannot list the extension's libraries")
    so = next(iter(target.glob("effkernels/_C*.so")))
    dyn = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True)
    needed = [ln.split("[", 1)[1].rstrip("]") for ln in dyn.stdout.splitlines()
              if "(NEEDED)" in ln]
    assert any(n.startswith("libc10") for n in needed), needed
    cuda_libs = [n for n in needed if "cuda" in n.lower() or n.startswith(("libnv", "libcu"))]
    assert not cuda_libs, f"the C++-only extension links CUDA libraries: {cuda_libs}"
    report = _run_installed(target, tmp_path)
    assert report["ran"] == ["cpu", "reference"]
