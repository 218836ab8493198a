"""`make kernels-report`: compiles every Triton kernel ahead of time for sm_80 and sm_90 (each
entry of each triton_kernels module's AOT_SPECS: every autotune config and main dtype) and
prints registers, spill bytes and shared memory per kernel and config, from ptxas -v on the
generated PTX. No GPU needed. Exits non-zero if any kernel fails to compile.

Then the CUDA C++ kernels (csrc/cuda) of the built extension: `cuobjdump --dump-resource-usage`
on effkernels/_C*.so lists, per kernel and arch (the cubins of TORCH_CUDA_ARCH_LIST), the
registers, the static shared memory (the dynamic part depends on the layer: see
dw_host.cu's pick_variant), the stack frame and the local memory per thread. Register spills live
in local memory, so LOCAL == 0 and STACK == 0 means no spills (ptxas -v's "0 bytes spill
stores" in the build log says the same). Exits non-zero if a CUDA kernel spills.
`python -m bench.kernels_report --cuda-only` skips the Triton part."""
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


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


# Template arguments of the csrc/cuda kernels that are codes (dw_params.h).
_K_NAMES = {"-1": "staged", "-2": "mixed"}


def _kernel_label(mangled: str) -> str:
    """effkernels::cuda::dw_fwd_kernel<float, -1, 2>(...) -> dw_fwd_kernel<float, K=staged, S=2>"""
    out = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    name = out or mangled
    m = re.match(r"(?:void )?(?:effkernels::cuda::(?:(?:\(anonymous namespace\)|\w+)::)*)?"
                 r"([\w]+)<([^>]*)>", name)
    if not m:
        return name.split("(")[0][:70]
    args = [a.strip() for a in m.group(2).split(",")]
    if m.group(1).startswith("dw_") and len(args) == 3:
        k = _K_NAMES.get(args[1], args[1])
        return f"{m.group(1)}<{args[0]}, K={k}, S={args[2]}>"
    if m.group(1).endswith("_mixed_kernel") and len(args) == 2:
        return f"{m.group(1)}<{args[0]}, S={args[1]}>"
    return f"{m.group(1)}<{', '.join(args)}>"


def cuda_rows(so: Path):
    """(kernel, arch, regs, static smem, stack, local) per kernel and cubin of the built .so."""
    text = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(so)], capture_output=True,
                          text=True).stdout
    rows, arch = [], "?"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+(?:\[\d\])?):(\d+)", lines[i + 1]))
            rows.append((_kernel_label(m.group(1)), arch, int(usage.get("REG", -1)),
                         int(usage.get("SHARED", 0)), int(usage.get("STACK", 0)),
                         int(usage.get("LOCAL", 0))))
    return sorted(set(rows), key=lambda r: (r[0], r[1]))


def cuda_report() -> int:
    root = Path(__file__).resolve().parent.parent
    cu = sorted(root.glob("csrc/cuda/*.cu"))
    sos = sorted((root / "effkernels").glob("_C*.so"))
    print(f"\nCUDA C++ kernels: {len(cu)} source files in csrc/cuda")
    if not cu:
        return 0
    if not sos:
        print("  effkernels/_C*.so not built: run `make build` (EFFK_BUILD_CUDA=1) first")
        return 1
    rows = cuda_rows(sos[0])
    if not rows:
        print(f"  {sos[0].name} holds no CUDA kernels (built without CUDA?)")
        return 1
    print(f"{'CUDA kernel':<52} {'arch':<6} {'regs':>4} {'smem B':>7} {'stack B':>7} "
          f"{'local B':>7}")
    for label, arch, regs, smem, stack, local in rows:
        print(f"{label:<52} {arch:<6} {regs:>4} {smem:>7} {stack:>7} {local:>7}")
    spilling = [r for r in rows if r[4] > 0 or r[5] > 0]
    print(f"{len(rows)} CUDA kernel cubins, {len(spilling)} with stack/local memory (spills)")
    return 1 if spilling else 0


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    failures = 0
    if "--cuda-only" not in sys.argv[1:]:
        rows, failures = triton_rows()
        print(f"{'Triton kernel / config':<62} {'arch':<6} {'regs':>4} {'spill B':>7} "
              f"{'smem B':>7} {'warps':>5}")
        for label, arch, regs, spill, smem, warps, err in rows:
            print(f"{label:<62} {arch:<6} {regs:>4} {spill:>7} {smem:>7} {warps:>5} {err}")
        spills = sum(1 for r in rows if r[3] > 0)
        print(f"{len(rows)} Triton compilations, {failures} failed, {spills} with spills")
    cuda_status = cuda_report()
    return 1 if failures or cuda_status else 0


if __name__ == "__main__":
    sys.exit(main())
