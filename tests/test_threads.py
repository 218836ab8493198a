"""Determinism and threads: the same inputs give the same bits on every run and for any
thread count (two-stage, fixed-order reductions), and Python threads may call ops at once."""
import threading

import pytest
import torch

import effkernels
from effkernels import ops

from .helpers import assert_close, bn_params, conv_weight, make_input


def _run_dw(training, seed=0):
    torch.manual_seed(seed)
    x = make_input((4, 24, 19, 21), torch.float32, "channels_last", requires_grad=True)
    w = conv_weight((24, 1, 5, 5), torch.float32).requires_grad_()
    g, b, rm, rv = bn_params(24)
    g.requires_grad_(); b.requires_grad_()
    y = ops.dwconv_bn_act(x, w, g, b, rm, rv, stride=2, act="silu", training=training)
    y.backward(torch.randn_like(y))
    return [y.detach(), x.grad, w.grad, g.grad, b.grad, rm, rv]


def _run_pw(training, seed=0):
    torch.manual_seed(seed)
    x = make_input((4, 40, 13, 15), torch.float32, "channels_last", requires_grad=True)
    w = conv_weight((72, 40, 1, 1), torch.float32).requires_grad_()
    g, b, rm, rv = bn_params(72)
    g.requires_grad_(); b.requires_grad_()
    y = ops.pwconv_bn_act(x, w, g, b, rm, rv, act="hswish", training=training)
    y.backward(torch.randn_like(y))
    return [y.detach(), x.grad, w.grad, g.grad, b.grad, rm, rv]


@pytest.mark.parametrize("run", [_run_dw, _run_pw], ids=["dwconv", "pwconv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bitwise_deterministic_across_runs_and_thread_counts(run, training):
    before = torch.get_num_threads()
    try:
        with effkernels.backend("cpu"):
            torch.set_num_threads(1)
            one = run(training)
            torch.set_num_threads(2)
            two = run(training)
            again = run(training)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b), "result depends on the thread count"
        assert torch.equal(b, c), "result differs between identical runs"


def _dw_inputs(seed):
    torch.manual_seed(seed)
    x = make_input((2, 16, 15, 17), torch.float32, "channels_last")
    g, b, rm, rv = bn_params(16)
    return x, conv_weight((16, 1, 3, 3), torch.float32), g, b, rm, rv


def _forward_backward(x, w, g, b, rm, rv):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, g, b)]
    y = ops.dwconv_bn_act(*leaves, rm, rv, act="relu6", training=True)
    y.backward(torch.ones_like(y))
    return [y.detach(), rm, rv] + [t.grad for t in leaves]


def test_ops_from_several_python_threads():
    inputs = [_dw_inputs(s) for s in range(6)]
    with effkernels.backend("cpu"):
        expected = [_forward_backward(*(t.clone() for t in inp)) for inp in inputs]
    results, errors = {}, []

    def work(i):
        try:
            with effkernels.backend("cpu"):
                results[i] = _forward_backward(*inputs[i])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, exp in enumerate(expected):
        for a, b in zip(results[i], exp):
            assert torch.equal(a, b)
