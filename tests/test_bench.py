"""Smoke test of the benchmark's bookkeeping (bench/): verification verdicts, the CSV and the
plots, on a tiny op case with tiny timings (no torch.compile, no ONNX Runtime)."""
import csv
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


def test_old_csv_is_migrated(tmp_path):
    path = tmp_path / "cpu-old.csv"
    path.write_text("timestamp,op,median_ms,speedup_vs\n2000,dwconv_bn_act,1.5,\n")
    common.append_rows(path, [{"timestamp": "2001", "op": "x", "median_ms": 2.0}])
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert back[0]["median_ms"] == "1.5" and back[1]["median_ms"] == "2"
