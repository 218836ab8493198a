"""Property-based fuzzing of every op against the float64 reference, with hypothesis.

Each example draws an op, a shape (N 1-3, C 1-20, H/W 1-13), a dtype (fp32, fp64, bf16), kernel
sizes 1..11 (odd and even for dwconv), stride, dilation, padding, activations, training/eval,
an input layout (contiguous, channels_last, sliced, sliced channels_last, permuted, broadcast
along N) and a backend (cpu, reference), then runs tests/opcase.check_op: output, every
gradient and the running statistics against the fp64 reference with helpers.TOL (bf16: at most
2x PyTorch's own bf16 error).

Draws that the op refuses with a ValueError are skipped, but only if an independent predicate
(`expected_invalid`) says the input is genuinely invalid (input smaller than the kernel's
reach, one value per channel in training); a ValueError for a valid input, or no error for an
invalid one, is a failure.

The examples run in a subprocess (`python -m tests.test_fuzz --seed S --examples N`), so a
crash of a kernel (segfault, abort) fails the test with the example that was running instead
of killing pytest. The subprocess prints one `FUZZ-CASE` line before each example, a
`FUZZ-FAIL` JSON line per failure (failures are collected, not raised: every failing example is
reported, no shrinking) and a `FUZZ-DONE` JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED = 8_2024
EXAMPLES = 500
ACTS = ["identity", "relu", "relu6", "hswish", "silu", "hsigmoid", "sigmoid"]
LAYOUTS = ["contiguous", "channels_last", "sliced", "sliced_cl", "permuted", "expanded_n"]
DTYPE_NAMES = ["float32", "float64", "bfloat16"]
OPS = ["dwconv_bn_act", "pwconv_bn_act", "mixconv_bn_act", "inverted_residual"]


# ---- the harness (pytest side) --------------------------------------------------------------

def run_fuzz(*args: str, timeout: float = 240) -> dict:
    """Runs the fuzz body in a fresh interpreter; returns its parsed report."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run([sys.executable, "-m", "tests.test_fuzz", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    report = {"returncode": proc.returncode, "failures": [], "done": None, "last_case": None,
              "stderr": proc.stderr[-4000:]}
    for line in proc.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag == "FUZZ-CASE":
            report["last_case"] = payload
        elif tag == "FUZZ-FAIL":
            report["failures"].append(json.loads(payload))
        elif tag == "FUZZ-DONE":
            report["done"] = json.loads(payload)
    return report


def _crash_message(report: dict) -> str:
    rc = report["returncode"]
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
    return (f"fuzz subprocess {how} while running example {report['last_case']}\n"
            f"stderr tail:\n{report['stderr']}")


def test_fuzz_ops_against_reference():
    report = run_fuzz("--seed", str(SEED), "--examples", str(EXAMPLES))
    assert report["returncode"] == 0 and report["done"] is not None, _crash_message(report)
    # The known cases are held by their own strict xfails below (they must keep failing until
    # fixed); every other failure fails here.
    failures = [f for f in report["failures"] if f["case"] not in KNOWN_IR_BF16 + KNOWN_FP32]
    assert not failures, f"{len(failures)} failing examples:\n" + "\n\n".join(
        f"{f['case']}\n  {f['error']}" for f in failures[:10])
    done = report["done"]
    # Not vacuous: most draws were compared, across every op, backend and dtype, and the
    # invalid-input path was exercised too.
    assert done["compared"] >= EXAMPLES // 2, done
    assert set(done["ops"]) == set(OPS), done
    assert set(done["backends"]) == {"cpu", "reference"}, done
    assert set(done["dtypes"]) == set(DTYPE_NAMES), done
    assert done["rejected"] >= 1, done


def test_fuzz_harness_reports_a_crash():
    """A segfault in the body is caught and names the example that was running."""
    report = run_fuzz("--seed", "1", "--examples", "3", "--crash-at", "1", timeout=120)
    assert report["returncode"] == -signal.SIGSEGV, report
    assert report["last_case"] is not None, report
    assert json.loads(report["last_case"])["op"] in OPS
    assert "killed by SIGSEGV" in _crash_message(report)


def test_fp64_hsigmoid_gradient_is_pytorchs():
    """PyTorch's hardsigmoid backward scales by float32's 1/6 in float64 too (torch 2.14:
    0.1666666716...); the kernels take the same constant (activation.h), so that float64 draws
    of hsigmoid compare against the reference at float64 tolerances and float64 models agree
    with PyTorch's to the last bits."""
    import torch
    import torch.nn.functional as F

    import effkernels
    from effkernels import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=g) * 3
    w = torch.randn(5, 1, 3, 3, dtype=torch.float64, generator=g)
    bn = [torch.rand(5, dtype=torch.float64, generator=g) + 0.5,
          torch.randn(5, dtype=torch.float64, generator=g),
          torch.randn(5, dtype=torch.float64, generator=g),
          torch.rand(5, dtype=torch.float64, generator=g) + 0.5]
    grads = []
    for fn in (lambda x: ops.dwconv_bn_act(x, w, *bn, act="hsigmoid"),
               lambda x: F.hardsigmoid(F.batch_norm(F.conv2d(x, w, padding=1, groups=5),
                                                    bn[2], bn[3], bn[0], bn[1]))):
        x_ = x.clone().requires_grad_()
        with effkernels.backend("cpu"):
            y = fn(x_)
        inside = ((y > 0) & (y < 1)).sum().item()
        grads.append(torch.autograd.grad(y.sum(), x_)[0])
    assert inside > 50, "no values on hsigmoid's slope"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-14)


# bf16 inverted_residual gradients beyond 2x PyTorch's own bf16 error (helpers.assert_lowp_close).
# The first two were found by this fuzzer with other seeds (--seed 7 --examples 2500: 18 of ~300
# bf16 inverted_residual draws), the others by SEED once float64 drew hsigmoid too. Measured
# 2026-11-30 (40 seeds each of a 2x8x7x7 training block, hsigmoid / silu): the block's error is
# on median 0.5-0.85x PyTorch's, so no precision is lost between the C++ block's stages; the
# misses are the tails of a ratio of two maxima: a pre-activation within a bf16 rounding of a
# kink (relu6 0/6, hsigmoid +-3) takes the other side in one of the two (one such flip: 58% of
# one channel's BN-weight gradient), and on one- or two-element gradients the ratio is of single
# rounding errors. Open: a rule for low-precision compositions that tells these from a real loss.
KNOWN_IR_BF16 = [
    {"act": "relu", "backend": "cpu", "cout": 5, "dilation": 2, "dtype": "bfloat16",
     "expand": 3, "k": 7, "layout": "channels_last", "op": "inverted_residual", "se": False,
     "se_gate": "sigmoid", "seed": 1468, "shape": [2, 13, 13, 13], "stride": 1,
     "training": False},
    {"act": "relu6", "backend": "cpu", "cout": 1, "dilation": 1, "dtype": "bfloat16",
     "expand": 2, "k": 3, "layout": "expanded_n", "op": "inverted_residual", "se": True,
     "se_gate": "hsigmoid", "seed": 30098046, "shape": [1, 4, 5, 4], "stride": 1,
     "training": True},
    {"act": "hsigmoid", "backend": "cpu", "cout": 9, "dilation": 1, "dtype": "bfloat16",
     "expand": 3, "k": 3, "layout": "contiguous", "op": "inverted_residual", "se": True,
     "se_gate": "sigmoid", "seed": 183, "shape": [1, 1, 3, 5], "stride": 1, "training": True},
    {"act": "hsigmoid", "backend": "cpu", "cout": 1, "dilation": 1, "dtype": "bfloat16",
     "expand": 3, "k": 3, "layout": "contiguous", "op": "inverted_residual", "se": True,
     "se_gate": "sigmoid", "seed": 183, "shape": [1, 1, 1, 5], "stride": 1, "training": True},
    {"act": "relu6", "backend": "cpu", "cout": 12, "dilation": 2, "dtype": "bfloat16",
     "expand": 3, "k": 3, "layout": "sliced_cl", "op": "inverted_residual", "se": False,
     "se_gate": "hsigmoid", "seed": 738005, "shape": [3, 16, 10, 10], "stride": 2,
     "training": False},
]

# PyTorch itself (the reference backend in float32) beyond the float32 tolerance: a training
# BatchNorm over two values per channel (N*H*W = 2) is ill-conditioned. Open: a tolerance that
# scales with the BatchNorm's conditioning.
KNOWN_FP32 = [
    {"act": "sigmoid", "backend": "reference", "cout": 15, "dilation": 1, "dtype": "float32",
     "expand": 3, "k": 9, "layout": "expanded_n", "op": "inverted_residual", "se": True,
     "se_gate": "sigmoid", "seed": 3789766, "shape": [2, 2, 1, 1], "stride": 1,
     "training": True},
]


_KNOWN_REASONS = [(KNOWN_IR_BF16, "bf16 inverted_residual gradients beyond 2x PyTorch's bf16 "
                                  "error (see KNOWN_IR_BF16)"),
                  (KNOWN_FP32, "float32 PyTorch beyond the float32 tolerance on a two-value "
                               "BatchNorm (see KNOWN_FP32)")]


@pytest.mark.parametrize("case", [
    pytest.param(case, id=f"{case['dtype']}-{case['seed']}-{i}",
                 marks=pytest.mark.xfail(strict=True, reason=reason))
    for cases, reason in _KNOWN_REASONS for i, case in enumerate(cases)])
def test_known_failing_cases(case):
    error, compared = run_case(case)
    assert compared and error is None, error


# ---- the fuzz body (subprocess side) --------------------------------------------------------

def expected_invalid(case: dict) -> bool:
    """Whether PyTorch itself refuses this input: the kernel's reach exceeds the padded input,
    or a BatchNorm in training mode sees one value per channel."""
    n, c, h, w = case["shape"]
    s, d, training = case["stride"], case["dilation"], case["training"]

    def out_size(size, k, pad):
        return (size + 2 * pad - d * (k - 1) - 1) // s + 1

    def too_small(k, pad):
        reach = d * (k - 1) + 1
        return h + 2 * pad < reach or w + 2 * pad < reach

    op = case["op"]
    if op == "dwconv_bn_act":
        k = case["k"]
        pad = case["padding"] if case["padding"] is not None else d * (k - 1) // 2
        if too_small(k, pad):
            return True
        counts = [n * out_size(h, k, pad) * out_size(w, k, pad)]
    elif op == "pwconv_bn_act":
        counts = [n * h * w]
    elif op == "mixconv_bn_act":
        if any(too_small(k, d * (k - 1) // 2) for _, k in case["groups"]):
            return True
        counts = [n * ((h - 1) // s + 1) * ((w - 1) // s + 1)]
    else:
        k = case["k"]
        pad = d * (k - 1) // 2
        counts = ([n * h * w] if case["expand"] != 1 else []) + \
            [n * out_size(h, k, pad) * out_size(w, k, pad)]
    return training and any(cnt == 1 for cnt in counts)


def draw_case(data) -> dict:
    from hypothesis import strategies as st

    op = data.draw(st.sampled_from(OPS), label="op")
    case = dict(
        op=op,
        backend=data.draw(st.sampled_from(["cpu", "reference"]), label="backend"),
        dtype=data.draw(st.sampled_from(DTYPE_NAMES), label="dtype"),
        shape=[data.draw(st.integers(1, 3), label="N"), data.draw(st.integers(1, 20), label="C"),
               data.draw(st.integers(1, 13), label="H"), data.draw(st.integers(1, 13), label="W")],
        layout=data.draw(st.sampled_from(LAYOUTS), label="layout"),
        stride=data.draw(st.sampled_from([1, 2]), label="stride"),
        dilation=data.draw(st.sampled_from([1, 2]), label="dilation"),
        act=data.draw(st.sampled_from(ACTS), label="act"),
        training=data.draw(st.booleans(), label="training"),
        seed=data.draw(st.integers(0, 2**31 - 1), label="seed"),
    )
    c = case["shape"][1]
    if op == "dwconv_bn_act":
        case["k"] = data.draw(st.integers(1, 11), label="k")
        reach = case["dilation"] * (case["k"] - 1)
        case["padding"] = data.draw(st.one_of(st.none(), st.integers(0, reach)), label="pad")
    elif op == "pwconv_bn_act":
        case["stride"] = case["dilation"] = 1
        case["cout"] = data.draw(st.integers(1, 20), label="Cout")
        case["residual"] = data.draw(st.booleans(), label="residual")
    elif op == "mixconv_bn_act":
        n_groups = data.draw(st.integers(1, min(3, c)), label="groups")
        cuts = sorted(data.draw(st.lists(st.integers(1, c - 1), min_size=n_groups - 1,
                                         max_size=n_groups - 1, unique=True), label="cuts")) \
            if n_groups > 1 else []
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [c])]
        case["groups"] = [(ci, data.draw(st.sampled_from([1, 3, 5, 7, 9, 11]), label="k_i"))
                          for ci in sizes]
    else:
        case["k"] = data.draw(st.sampled_from([1, 3, 5, 7, 9, 11]), label="k")
        case["expand"] = data.draw(st.sampled_from([1, 2, 3]), label="expand")
        case["cout"] = data.draw(st.integers(1, 20), label="Cout")
        case["se"] = data.draw(st.booleans(), label="se")
        case["se_gate"] = data.draw(st.sampled_from(["sigmoid", "hsigmoid"]), label="gate")
    return case


def build(case: dict):
    """The op's tensor arguments and kwargs for a drawn case (see tests/test_ops.py)."""
    import torch

    from .helpers import bn_params, conv_weight

    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n, c, h, w = case["shape"]

    def x_in(shape):
        n_, c_, h_, w_ = shape
        layout = case["layout"]
        if layout == "expanded_n":
            return torch.randn(1, c_, h_, w_, dtype=torch.float64).to(dtype).expand(shape)
        if layout == "permuted":
            return torch.randn(n_, c_, w_, h_, dtype=torch.float64).to(dtype).transpose(2, 3)
        if layout in ("sliced", "sliced_cl"):
            fmt = torch.channels_last if layout == "sliced_cl" else torch.contiguous_format
            big = torch.randn(n_, c_ + 3, h_, 2 * w_, dtype=torch.float64).to(dtype)
            return big.contiguous(memory_format=fmt)[:, 2:2 + c_, :, ::2]
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" \
            else x

    def bn(ch):
        return dict(zip(("bn_weight", "bn_bias", "running_mean", "running_var"),
                        bn_params(ch, dtype=bn_dtype)))

    def stage(cout, cin, k):
        shape = (cout, 1, k, k) if cin == 1 else (cout, cin, 1, 1)
        return [conv_weight(shape, dtype), *bn_params(cout, dtype=bn_dtype)]

    op, x = case["op"], x_in((n, c, h, w))
    common = dict(act=case["act"], training=case["training"])
    if op == "dwconv_bn_act":
        tensors = dict(x=x, weight=conv_weight((c, 1, case["k"], case["k"]), dtype), **bn(c))
        kwargs = dict(stride=case["stride"], padding=case["padding"],
                      dilation=case["dilation"], **common)
    elif op == "pwconv_bn_act":
        cout = case["cout"]
        tensors = dict(x=x, weight=conv_weight((cout, c, 1, 1), dtype), **bn(cout))
        if case["residual"]:
            tensors["residual"] = torch.randn(n, cout, h, w, dtype=torch.float64).to(dtype)
        kwargs = common
    elif op == "mixconv_bn_act":
        tensors = dict(x=x, weights=[conv_weight((ci, 1, k, k), dtype)
                                     for ci, k in case["groups"]], **bn(c))
        kwargs = dict(stride=case["stride"], dilation=case["dilation"], **common)
    else:
        mid = c * case["expand"]
        se = []
        if case["se"]:
            r = max(1, mid // 4)
            se = [conv_weight((r, mid, 1, 1), dtype), torch.randn(r).to(dtype),
                  conv_weight((mid, r, 1, 1), dtype), torch.randn(mid).to(dtype)]
        tensors = dict(x=x, expand=stage(mid, c, 1) if case["expand"] != 1 else [],
                       depthwise=stage(mid, 1, case["k"]), se=se,
                       project=stage(case["cout"], mid, 1))
        kwargs = dict(stride=case["stride"], dilation=case["dilation"],
                      se_gate=case["se_gate"], **common)
    return tensors, kwargs, dtype


def run_case(case: dict):
    """None if the case passed or was rejected as expected, else the failure message; and
    whether it was compared."""
    from .opcase import check_op

    tensors, kwargs, dtype = build(case)
    invalid = expected_invalid(case)
    try:
        check_op(case["op"], tensors, kwargs, case["backend"], dtype)
    except ValueError as exc:
        if invalid:
            return None, False
        return f"ValueError for a valid input: {exc}", False
    except AssertionError as exc:
        return f"mismatch: {str(exc).splitlines()[0]}", True
    except Exception as exc:  # any other error is a failure, reported with its type
        tb = traceback.format_exc(limit=-3).replace("\n", " | ")
        return f"{type(exc).__name__}: {exc} [{tb}]", False
    if invalid:
        return "accepted an invalid input (expected a ValueError)", True
    return None, True


def main(argv=None) -> int:
    import torch
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    import effkernels

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--examples", type=int, default=EXAMPLES)
    parser.add_argument("--crash-at", type=int, default=-1,
                        help="segfault at this example (tests the harness)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    # As tests/conftest.py: fresh tensors are NaN-poisoned, so an unwritten output shows.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert effkernels.available_backends("cpu")["cpu"] == "available", \
        effkernels.extension_error()

    summary = dict(examples=0, compared=0, rejected=0, failed=0, ops=[], backends=[],
                   dtypes=[])

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        case = draw_case(data)
        index = summary["examples"]
        summary["examples"] += 1
        print("FUZZ-CASE", json.dumps(case, sort_keys=True), flush=True)
        if index == args.crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        error, compared = run_case(case)
        summary["compared"] += compared
        summary["rejected"] += error is None and not compared
        for key, value in (("ops", case["op"]), ("backends", case["backend"]),
                           ("dtypes", case["dtype"])):
            if compared and value not in summary[key]:
                summary[key].append(value)
        if error is not None:
            summary["failed"] += 1
            print("FUZZ-FAIL", json.dumps(dict(case=case, error=error), sort_keys=True),
                  flush=True)
        effkernels.set_backend("auto")

    fuzz()
    print("FUZZ-DONE", json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
