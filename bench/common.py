"""Timing, environment and CSV helpers shared by the benchmarks."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

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
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:
        pass
    return ", ".join(parts)


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.3,
            warmup: int = 3) -> Dict[str, float]:
    """Median and p20/p80 in milliseconds. GPU: triton.testing.do_bench when available (CUDA
    events otherwise); CPU: a warmed-up loop of timed calls, at least min_time seconds."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
            q = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_time and len(samples) < 2000):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10)
    return {"median_ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7]}


def csv_path(device: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    return RESULTS / f"{device}-{date}.csv"


FIELDS = ["timestamp", "device", "device_name", "versions", "suite", "op", "shape", "dtype",
          "mode", "impl", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup_vs",
          "speedup", "verified"]


def append_rows(path: Path, rows: List[Dict[str, object]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def env_summary() -> str:
    return f"{device_name('cpu')}; {versions()}; OMP threads {os.environ.get('OMP_NUM_THREADS', '-')}"
