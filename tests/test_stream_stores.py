"""The CPU kernels' streaming (non-temporal) result stores (cpu_common.h stream_results): used
only for outputs larger than the threads' caches, so the test shapes would never take them;
EFFK_CPU_STREAM=1 (read once per process) forces them in a child process, whose results must
be bitwise those of this process's normal stores, and match the float64 reference."""
import os
import subprocess
import sys
import textwrap

import torch

from effkernels import ops, reference

from .helpers import assert_close, bn_params, conv_weight, make_input

# (op, N, C or groups, H, W, k, stride, layout): line-aligned channel counts and not (C=40:
# the overlapping tail block; NCHW: an NHWC buffer copied back), both strides, k 3 and 5,
# rows narrower than a tile.
CASES = [
    ("dw", 2, 32, 9, 13, 3, 1, "channels_last"),
    ("dw", 1, 40, 11, 7, 5, 2, "channels_last"),
    ("dw", 2, 48, 6, 3, 3, 2, "contiguous"),
    ("mix", 2, [(16, 3), (24, 5), (20, 7)], 8, 10, None, 1, "channels_last"),
]

_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_stream_stores import compute
    torch.save(compute(), sys.argv[1])
""")


def _inputs(case):
    kind, n, c, h, w, k, stride, layout = case
    channels = sum(ci for ci, _ in c) if kind == "mix" else c
    x = make_input((n, channels, h, w), torch.float32, layout)
    weights = ([conv_weight((ci, 1, ki, ki), torch.float32) for ci, ki in c] if kind == "mix"
               else conv_weight((c, 1, k, k), torch.float32))
    return x, weights, bn_params(channels)


def compute():
    """Every case's eval output, from a fixed seed (the same in both processes)."""
    torch.manual_seed(1234)
    outs = []
    with torch.no_grad():
        for case in CASES:
            x, weights, bn = _inputs(case)
            fn = ops.mixconv_bn_act if case[0] == "mix" else ops.dwconv_bn_act
            outs.append(fn(x, weights, *bn, stride=case[6], act="relu6", training=False))
    return outs


def test_streamed_results_equal_the_normal_stores_and_the_reference(tmp_path):
    ours = compute()
    torch.manual_seed(1234)
    with torch.no_grad():
        for case, out in zip(CASES, ours):
            x, weights, bn = _inputs(case)
            fn = reference.mixconv_bn_act if case[0] == "mix" else reference.dwconv_bn_act
            ref = fn(x.double(), [w.double() for w in weights] if case[0] == "mix"
                     else weights.double(), *[t.double() for t in bn], stride=case[6],
                     act="relu6", training=False)
            assert_close(out, ref, torch.float32, f"normal stores {case}")
    path = tmp_path / "streamed.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "EFFK_CPU_STREAM": "1"}
    subprocess.run([sys.executable, "-c", _CHILD.format(root=root), str(path)], check=True,
                   env=env, cwd=root, timeout=300)
    streamed = torch.load(path)
    for case, a, b in zip(CASES, ours, streamed):
        assert b.is_contiguous(memory_format=torch.channels_last) == \
            a.is_contiguous(memory_format=torch.channels_last), case
        assert torch.equal(a, b), f"streamed result differs from the normal stores: {case}"
