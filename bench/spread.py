"""How much single measurements move on this machine (bench/NOTES.md):

    python -m bench.spread [--processes 4]

1. The MobileNetV2 block (C24 t6 56x56, N=1, eval, channels_last, no_grad): timm's module
   (PyTorch eager) and ours (after effkernels.convert), each process measuring both, in
   several fresh processes: the spread between processes is what separates two runs. Once
   with glibc's malloc defaults, once with the benchmark's setting (common.steady_malloc),
   with the page faults per call: with the defaults, eager's intermediates can be
   page-faulted in again on every call, depending on the process's heap layout.
2. The cost of one op call on a tiny tensor (so the time is the call path, not the kernel):
   ops.pwconv_bn_act, the torch.ops call (through torch.library's autograd wrapper), and
   OpOverload.redispatch straight to the CPU kernel.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def _median_ms(fn, n: int = 400, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e3


def _faults_per_call(fn, n: int = 100) -> float:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n


def block_once(steady: bool) -> None:
    import torch

    from . import blocks, common

    if steady:
        common.steady_malloc()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    theirs, ours = blocks._blocks_pair(blocks.BLOCKS["ir_mbv2"][0])
    cl = torch.channels_last
    theirs = theirs.eval().to(memory_format=cl)
    ours = ours.eval().to(memory_format=cl)
    x = torch.randn(1, 24, 56, 56).contiguous(memory_format=cl)
    with torch.no_grad():
        eager, mine = _median_ms(lambda: theirs(x)), _median_ms(lambda: ours(x))
        print(f"eager_cl {eager:.3f} ms ({_faults_per_call(lambda: theirs(x)):.0f} page faults "
              f"per call)  effkernels {mine:.3f} ms "
              f"({_faults_per_call(lambda: ours(x)):.0f})")


def call_overhead() -> None:
    import torch

    from effkernels import ops

    torch.set_num_threads(2)
    x = torch.randn(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    w, g, b = torch.randn(8, 8, 1, 1), torch.rand(8) + 0.5, torch.randn(8)
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    args = (x, w, g, b, rm, rv, None, "relu6", False, 1e-5)
    op = torch.ops.effkernels.pwconv_bn_act
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with torch.no_grad():
        for name, fn in (("ops.pwconv_bn_act", lambda: ops.pwconv_bn_act(x, w, g, b, rm, rv)),
                         ("torch.ops call", lambda: op(*args)),
                         ("redispatch to CPU", lambda: op.default.redispatch(cpu, *args))):
            print(f"{name:<20} {_median_ms(fn, n=5000, warmup=200) * 1e3:6.1f} us per call")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--block-once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steady-malloc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.block_once:
        block_once(args.steady_malloc)
        return 0
    for steady in (False, True):
        print("MobileNetV2 block C24 t6 56x56 N=1, eval, channels_last, one line per process, "
              + ("the benchmark's malloc setting (common.steady_malloc):" if steady
                 else "glibc's malloc defaults:"))
        for _ in range(args.processes):
            cmd = [sys.executable, "-m", "bench.spread", "--block-once"]
            out = subprocess.run(cmd + (["--steady-malloc"] if steady else []),
                                 capture_output=True, text=True, check=True).stdout
            print("  " + out.strip())
    print("One op call on a (1, 8, 2, 2) tensor, no_grad:")
    call_overhead()
    return 0


if __name__ == "__main__":
    sys.exit(main())
