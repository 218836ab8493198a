"""Smoke test of the benchmark's bookkeeping (bench/): verification verdicts, the CSV and the
plots, on a tiny op case with tiny timings (no torch.compile, no ONNX Runtime)."""
import csv
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from bench import common, harness, ops, plot


def _opts(**kw):
    base = dict(device="cpu", dtype=torch.float32, compile_budget=0, ort="off", compile_ours=False,
                quick=True, op=None, model=None)
    return SimpleNamespace(**{**base, **kw})


def test_case_rows_csv_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    opts = _opts()
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        case = ops.dw_case(8, 6, 3, 1, "relu6", 2, mode, opts)
        rows += harness.run_case(case, "cpu", 0.0, harness.CompileBudget(0), min_samples=2)
    by = {(r["mode"], r["impl"]): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert by[(mode, "effkernels")]["verified"] == "ok", by[(mode, "effkernels")]
        assert by[(mode, "eager_nchw")]["speedup"] > 0
        assert by[(mode, "compile")]["verified"] == "skipped"
        assert by[(mode, "effkernels")]["peak_mem_mb"] >= 0
    path = tmp_path / "cpu-test.csv"
    meta = {"timestamp": "2000-01-01T00:00:00", "device": "cpu", "device_name": "test",
            "versions": common.versions(), "dtype": "float32"}
    common.append_rows(path, [{**meta, **r} for r in rows])
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == common.FIELDS and len(back) == len(rows)
    pngs = plot.plot(path)
    assert [p.name for p in pngs] == ["cpu-test-ops-fwd.png", "cpu-test-ops-fwdbwd.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_wrong_kernel_is_reported_not_timed():
    opts = _opts()
    case = ops.dw_case(8, 6, 3, 1, "relu6", 2, "fwd", opts)
    built = case.build
    def broken():
        b = built()
        ours = next(i for i in b.impls if i.name == harness.OURS)
        ours.result = lambda: [torch.zeros(2, 8, 6, 6)]
        return b
    case.build = broken
    rows = harness.run_case(case, "cpu", 0.0, harness.CompileBudget(0), min_samples=2)
    ours = next(r for r in rows if r["impl"] == harness.OURS)
    assert ours["verified"].startswith("WRONG") and "median_ms" not in ours
    assert all("speedup" not in r for r in rows)


def test_interleaved_timing_rounds_and_gc():
    import gc

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    stats = common.time_interleaved(fns, "cpu", min_time=0.0, warmup=1, min_samples=3,
                                    rounds=4)
    assert set(stats) == {"a", "b"}
    assert all(s["median_ms"] >= 0 and s["p20_ms"] <= s["p80_ms"] for s in stats.values())
    timed = calls[2:]  # after one warm-up call each
    # Rounds alternate the functions; the last round tops each up to min_samples.
    assert timed[:6] == ["a", "b", "a", "b", "a", "b"]
    assert timed.count("a") >= 3 and timed.count("b") >= 3
    assert gc.isenabled()

    def boom():
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        common.time_interleaved({"a": fns["a"], "boom": boom}, "cpu", min_time=0.0, warmup=0)
    assert gc.isenabled()


def test_interleaved_timing_pauses_after_the_settle_functions(monkeypatch):
    """ONNX Runtime (own_threads) runs in the rounds; an untimed pause follows each of its
    slices, so its spinning pool is idle when the next function's slice starts."""
    events = []
    monkeypatch.setattr(common.time, "sleep", lambda s: events.append(("sleep", s)))
    fns = {"a": lambda: events.append("a"), "ort": lambda: events.append("ort")}
    common.time_interleaved(fns, "cpu", min_time=0.0, warmup=0, min_samples=2, rounds=2,
                            settle={"ort": 0.05})
    assert events == ["a", "ort", ("sleep", 0.05)] * 2
    assert harness.SETTLE_S >= 0.05


def test_a_failing_implementation_leaves_the_others_timed():
    opts = _opts()
    case = ops.dw_case(8, 6, 3, 1, "relu6", 2, "fwd", opts)
    built = case.build
    state = {"n": 0}

    def flaky():  # passes verification, then raises while timed
        b = built()
        nchw = next(i for i in b.impls if i.name == "eager_nchw")
        run = nchw.run

        def run_then_fail():
            state["n"] += 1
            if state["n"] > 1:
                raise RuntimeError("flaky")
            return run()
        nchw.run = run_then_fail
        return b
    case.build = flaky
    rows = {r["impl"]: r for r in harness.run_case(case, "cpu", 0.0, harness.CompileBudget(0),
                                                   min_samples=2)}
    assert rows["eager_nchw"]["verified"].startswith("ERROR")
    assert rows[harness.OURS]["median_ms"] > 0 and rows["eager_cl"]["speedup"] > 0


def test_old_csv_is_migrated(tmp_path):
    path = tmp_path / "cpu-old.csv"
    path.write_text("timestamp,op,median_ms,speedup_vs\n2000,dwconv_bn_act,1.5,\n")
    common.append_rows(path, [{"timestamp": "2001", "op": "x", "median_ms": 2.0}])
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert back[0]["median_ms"] == "1.5" and back[1]["median_ms"] == "2"


def _row(suite, op, shape, batch, mode, impl, ms, **kw):
    return {"timestamp": "2000-01-01T00:00:00", "device": "cpu", "device_name": "test cpu",
            "versions": "torch x", "threads": 2, "backend": "cpu", "dtype": "float32",
            "command": "python -m bench.run --targets", "suite": suite, "op": op,
            "shape": shape, "batch": batch, "mode": mode, "impl": impl, "median_ms": ms, **kw}


def test_report_checks_the_targets_and_updates_the_readme(tmp_path):
    from bench import report

    dw = ops.dw_label(*ops.MBV2_DW[0])
    pw = ops.pw_label(*ops.MBV2_PW[0])
    rows = [_row("ops", "dwconv_bn_act", dw, 1, "fwd", "eager_cl", 3.0),    # 1.5x: met
            _row("ops", "dwconv_bn_act", dw, 1, "fwd", "effkernels", 2.0),
            _row("ops", "pwconv_bn_act", pw, 8, "fwd", "eager_cl", 1.1),    # 1.1x: missed
            _row("ops", "pwconv_bn_act", pw, 8, "fwd", "effkernels", 1.0),
            _row("ops", "dwconv_bn_act", "C7 9x9 k5 s1 relu", 1, "fwd", "eager_cl", 1.0),
            _row("ops", "dwconv_bn_act", "C7 9x9 k5 s1 relu", 1, "fwd", "effkernels", 1.0),
            _row("models", "mixnet_s", "224x224", 8, "eval", "onnxruntime", 10.0),
            _row("models", "mixnet_s", "224x224", 8, "eval", "compile", 13.0),
            _row("models", "mixnet_s", "224x224", 8, "eval", "effkernels", 12.0)]
    path = tmp_path / "cpu-x.csv"
    common.append_rows(path, rows)
    text = report.report(path)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
             if line.startswith("| ") and "|---" not in line}
    assert lines[f"dwconv_bn_act {dw}"].rstrip(" |").endswith("met")
    assert "missed vs eager CL >= 1.20x" in lines[f"pwconv_bn_act {pw}"]
    assert lines["dwconv_bn_act C7 9x9 k5 s1 relu"].endswith("|  |")  # no target named
    # mixnet_s at batch 8: 10/12 = 0.83x ORT (>= 1/1.2: met), 13/12 vs compile: met
    assert lines["mixnet_s 224x224"].rstrip(" |").endswith("met")
    assert "met on 2 of 3 cases" in text and "`python -m bench.run --targets`" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    report.update_readme(readme, text)
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith(f"{report.END}\nrest\n")
    assert "old" not in new and text in new


def test_block_cpu_script_smoke():
    """bench.block_cpu (the fused block against eager/ORT, with --cpu-time) runs on the shared
    timing and ORT code: one short round of the block at batch 1, in a process of its own (it
    sets the benchmark's malloc options, process-wide)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.block_cpu", "--batches", "1", "--rounds", "1",
         "--min-time", "0.01", "--no-compile", "--no-csv", "--cpu-time", "--threads", "1"],
        capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("block mbv2 24x56x56 t6 s1 N=1"))
    assert "x" in line.split("   ")[-1]  # the ratios were computed


def test_gpu_targets_script_dry_run(tmp_path):
    """bench.gpu_targets (issue 4's GPU targets; bench/gpu_check.sh runs it on a GPU) on tiny
    CPU shapes: every measurement is built, checked against PyTorch and timed, the CSV is
    written, and the summary computes the ratios it can from the rows."""
    from bench import gpu_targets

    path = tmp_path / "t.csv"
    assert gpu_targets.main(["--device", "cpu", "--small", "--dtype", "float32",
                             "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    targets = {r["target"].split(" C")[0].split(" 8->")[0] for r in rows}
    assert {"copy 1 GiB", "dw fwd eval", "dw fwd train", "dw bwd (dx, dw, dBN)",
            "dweight alone", "pw fwd eval", "pw fwd train", "pw bwd", "mixconv fwd eval",
            "mixconv bwd", "block fwd eval", "block train step"} <= targets
    assert all(float(r["median_ms"]) > 0 and not r["verified"] for r in rows)
    checked = [r for r in rows if r["max_abs_err"]]
    assert len(checked) == 7 and all(float(r["max_abs_err"]) < 1e-3 for r in checked)
    # The block: the fused kernel called as such, the ops composed, and the API's default path.
    assert {"cpu fused", "cpu composed", "cpu ops.inverted_residual"} <= {
        r["impl"] for r in rows if r["target"].startswith("block")}
    # The summary's ratios of rows that exist on a GPU, from made-up times.
    fake = [{"target": "copy 1 GiB", "impl": "torch copy_", "median_ms": 1.0, "GB_per_s": 2000},
            {"target": "dw fwd eval X", "impl": "cuda", "median_ms": 1.0, "GB_per_s": 1700},
            {"target": "dw fwd eval X", "impl": "triton", "median_ms": 1.5},
            {"target": "dw fwd eval X", "impl": "eager_cl (cuDNN)", "median_ms": 2.5},
            {"target": "pw fwd eval Y", "impl": "cuda", "median_ms": 1.1},
            {"target": "pw fwd eval Y", "impl": "cuBLAS GEMM alone", "median_ms": 1.0}]
    text = gpu_targets.summary(fake)
    assert "cuda at 85% of the copy bandwidth" in text and "2.50x eager cuDNN" in text
    assert "cuda vs triton 1.50x" in text and "cuda takes 1.10x cuBLAS's GEMM time" in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_steady_malloc_in_a_process_of_its_own():
    """The benchmark keeps freed memory in glibc's heap (no mmap, no trim), so an eager
    baseline's intermediates are not page-faulted in again on every call."""
    code = textwrap.dedent("""
        import resource, torch
        from bench import common
        print(common.steady_malloc())
        def call():  # MB-sized intermediates, allocated and freed
            a = torch.empty(1 << 20); b = torch.empty(3 << 19); a.fill_(1); b.fill_(2)
        for _ in range(10): call()  # the heap grows for the first few calls
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20): call()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         check=True).stdout.split()
    assert out[:5] == ["glibc:", "no", "mmap,", "no", "trim"]
    assert int(out[5]) < 20  # with glibc's defaults here: ~230 per call
