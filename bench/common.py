"""Timing, environment and CSV helpers shared by the benchmarks."""
from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for mod in ("triton", "timm", "torchvision", "onnxruntime"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - optional
            pass
    return ", ".join(parts)


_MALLOC = "default"


def steady_malloc() -> str:
    """Keeps the memory the process frees in glibc's heap for the rest of the run: no chunk
    served by mmap (M_MMAP_MAX 0) and no heap trimming (M_TRIM_THRESHOLD at its maximum).
    With glibc's defaults, whether a freed MB-sized tensor goes back to the kernel depends on
    the heap's layout; when it does, every call of an eager baseline page-faults its
    intermediates in again, and ratios against it swing up to 3.4x (`python -m bench.spread`
    shows the eager MobileNetV2 block with either setting, and its page faults per call). PyTorch's CPU tuning guides recommend jemalloc/tcmalloc for the same reason;
    ONNX Runtime has its own arena. Done for the benchmark process only (the library never
    touches the allocator). Returns what was set, for the printed header."""
    global _MALLOC
    if not sys.platform.startswith("linux"):
        return _MALLOC
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return _MALLOC
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1:
        _MALLOC = "glibc: no mmap, no trim"
    return _MALLOC


def malloc_setting() -> str:
    return _MALLOC


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.3,
            warmup: int = 3, min_samples: int = 5) -> Dict[str, float]:
    """Median and p20/p80 in milliseconds of one function (time_interleaved with one)."""
    return time_interleaved({"fn": fn}, device, min_time, warmup, min_samples)["fn"]


def _warm_up(fn: Callable[[], object], device: str, warmup: int) -> None:
    """`warmup` calls, one only when a call takes over 0.2 s."""
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if time.perf_counter() - t0 > 0.2:
            break


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, min_time: float = 0.3,
                     warmup: int = 3, min_samples: int = 5, rounds: int = 10,
                     settle: Optional[Dict[str, float]] = None,
                     clock: Callable[[], float] = time.perf_counter
                     ) -> Dict[str, Dict[str, float]]:
    """Median and p20/p80 in milliseconds of each function. GPU: triton.testing.do_bench per
    function when available (CUDA events otherwise). CPU: after warm-up, `rounds` rounds in
    which each function in turn is called for min_time/rounds seconds (at least once, and
    min_samples calls over all rounds), so that a slow spell of this shared machine falls on
    every function alike rather than on the one being timed (the ratios are what we report);
    Python's garbage collector is off while timing, as in timeit (a collection's cost would
    fall on whichever call triggers it). settle: seconds to pause (untimed) after the named
    functions' slices, for those that keep their own threads spinning after a call (ONNX
    Runtime's intra-op pool), so that the next function's slice starts on idle cores. clock:
    what a call's time is read from (the slices are cut by the wall clock); time.process_time
    with one thread ignores the time other processes take the core on a shared machine."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
            out = {}
            for name, fn in fns.items():
                q = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                out[name] = {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
            return out
        except ImportError:
            pass
    for fn in fns.values():
        _warm_up(fn, device, warmup)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    slice_s = min_time / rounds
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            last = r == rounds - 1
            for name, fn in fns.items():
                got = samples[name]
                start = time.perf_counter()
                while True:
                    synchronize(device)
                    c0 = clock()
                    fn()
                    synchronize(device)
                    c1, t1 = clock(), time.perf_counter()
                    got.append((c1 - c0) * 1e3)
                    if len(got) >= 2000 or (t1 - start >= slice_s
                                            and (not last or len(got) >= min_samples)):
                        break
                if settle and name in settle:
                    time.sleep(settle[name])
    finally:
        if was_enabled:
            gc.enable()
    out = {}
    for name, got in samples.items():
        q = statistics.quantiles(got, n=10) if len(got) > 1 else got * 9
        out[name] = {"median_ms": statistics.median(got), "p20_ms": q[1], "p80_ms": q[7]}
    return out


def csv_path(device: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    return RESULTS / f"{device}-{date}.csv"


# One row per (case, implementation). speedup: on a baseline's row, its median / effkernels'
# median in the same run (how many times faster ours is). speedup_vs is only in rows written by
# the first version of this script (one extra row per speed-up); bench.plot recomputes speed-ups
# from the medians and ignores it.
FIELDS = ["timestamp", "device", "device_name", "versions", "threads", "backend", "suite", "op",
          "shape", "batch", "dtype", "mode", "impl", "median_ms", "p20_ms", "p80_ms",
          "items_per_s", "peak_mem_mb", "mem_measure", "compile_s", "setup_s", "speedup",
          "verified", "max_err", "note", "speedup_vs", "command"]


def append_rows(path: Path, rows: List[Dict[str, object]]) -> None:
    """Appends rows; a file written with other columns is rewritten once with FIELDS first
    (its rows kept, new columns empty)."""
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != FIELDS:
                old = list(reader)
                extra = [k for k in (reader.fieldnames or []) if k not in FIELDS]
                with path.open("w", newline="") as g:
                    w = csv.DictWriter(g, fieldnames=FIELDS + extra)
                    w.writeheader()
                    w.writerows(old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in FIELDS})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


@contextlib.contextmanager
def _quiet_stderr():
    """kineto logs every profiler start/stop on file descriptor 2; hide that."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(fn: Callable[[], object], device: str):
    """(MiB, what it measures) for one call of fn, or (None, why not).
    cuda: torch.cuda.max_memory_allocated during the call minus the memory allocated before it.
    cpu: the peak of torch's CPU tensor allocations during the call beyond those live before it,
    replayed from torch.profiler's allocation events (profile_memory=True); memory that is not
    a torch tensor (ONNX Runtime's arena, the allocator's own caching) is not seen."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda_max_allocated"
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
    if not allocs:
        return None, "no torch allocations seen"
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak / 2**20, "torch_cpu_alloc_peak"


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def env_summary() -> str:
    return f"{device_name('cpu')}; {versions()}; OMP threads {os.environ.get('OMP_NUM_THREADS', '-')}"
