"""`make kernels-report`: compiles every Triton kernel ahead of time for sm_80 and sm_90 (each
entry of each triton_kernels module's AOT_SPECS: every autotune config and main dtype) and
prints registers, spill bytes and shared memory per kernel and config, from ptxas -v on the
generated PTX. No GPU needed. Exits non-zero if any kernel fails to compile.

The CUDA C++ kernels' ptxas figures are listed here too once csrc/cuda has kernels."""
from __future__ import annotations

import concurrent.futures
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)


def _ptxas() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _ptxas_stats(ptx: str, arch: int) -> dict:
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", str(src), "-o",
                              str(Path(d) / "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return {"regs": max(map(int, regs)) if regs else -1, "spill": max(spills) if spills else 0}


def _compile_one(job):
    """Compiles AOT_SPECS[index] of a triton_kernels module for one arch (in a worker)."""
    module_name, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.import_module(module_name).AOT_SPECS[index]
    label = f"{module_name.rsplit('.', 1)[1]}: {spec['label']}"
    try:
        # attrs: the pointer-alignment specialisation the JIT applies at launch.
        kw = {"attrs": spec["attrs"]} if spec.get("attrs") else {}
        src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"],
                                        constexprs=spec.get("constexprs", {}), **kw)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(spec.get("options", {})))
        stats = _ptxas_stats(k.asm["ptx"], arch)
        return (label, f"sm_{arch}", stats["regs"], stats["spill"], k.metadata.shared,
                k.metadata.num_warps, "")
    except Exception as exc:  # reported, and fails the report
        msg = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else ""
        return (label, f"sm_{arch}", -1, -1, -1, -1,
                f"COMPILE ERROR {type(exc).__name__}: {msg}")


def triton_rows():
    import effkernels.triton_kernels as pkg

    jobs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        name = f"{pkg.__name__}.{info.name}"
        specs = getattr(importlib.import_module(name), "AOT_SPECS", [])
        jobs += [(name, i, arch) for i in range(len(specs)) for arch in ARCHS]
    workers = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(_compile_one, jobs))
    return rows, sum(1 for r in rows if r[6])


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    rows, failures = triton_rows()
    print(f"{'Triton kernel / config':<62} {'arch':<6} {'regs':>4} {'spill B':>7} "
          f"{'smem B':>7} {'warps':>5}")
    for label, arch, regs, spill, smem, warps, err in rows:
        print(f"{label:<62} {arch:<6} {regs:>4} {spill:>7} {smem:>7} {warps:>5} {err}")
    spills = sum(1 for r in rows if r[3] > 0)
    print(f"{len(rows)} Triton compilations, {failures} failed, {spills} with spills")
    cu = sorted(Path(__file__).resolve().parent.parent.glob("csrc/cuda/*.cu"))
    print(f"CUDA C++ kernels: {len(cu)} source files"
          + ("" if cu else " (the CUDA backend has not landed yet)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
