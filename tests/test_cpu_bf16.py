"""bf16 on the CPU: the bf16 GEMMs of the pointwise conv and of the fused inverted-residual block,
AMX's tile kernel (TDPBF16PS) or AVX-512 BF16's pair kernel (vdpbf16ps: two bf16 products
summed into fp32 per instruction): that each runs exactly on the CPUs that have the
instructions (effkernels.cpu_isa()), that the paths they replace there stay correct (forced with
EFFK_CPU_ISA=avx512bf16 / avx512), that both compute every product of every row (to one bf16
rounding of the float64 result, at every tail of rows and k), and that their bits depend on the
data only (not on the thread count); and the depthwise kernel's bf16 fast path.

Which GEMM ran is observable too: both bf16 kernels treat bf16 subnormal inputs as zero, the
fp32 path does not."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import effkernels
from effkernels import ops

from .helpers import bn_params, conv_weight, make_input, per_thread_count

pytestmark = pytest.mark.skipif(not effkernels._extension.loaded(),
                                reason="effkernels._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


# EFFK_CPU_ISA's levels, narrowest first (effkernels.cpu_isa() names the one in use).
ISA_LEVELS = ("base", "avx2", "avx512", "avx512bf16", "amx")


def _widest_isa(flags):
    """The level this CPU supports, from /proc/cpuinfo (Linux grants AMX's state since 5.16)."""
    level = "base"
    if {"avx2", "fma"} <= flags:
        level = "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            level = "avx512"
            if "avx512_bf16" in flags:
                level = "avx512bf16"
                if {"amx_tile", "amx_bf16"} <= flags:
                    level = "amx"
    return level


def _cpu_has_avx512_bf16():
    return ISA_LEVELS.index(_widest_isa(_cpu_flags())) >= ISA_LEVELS.index("avx512bf16")


def _python(script, isa=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("EFFK_CPU_ISA", None)
    if isa:
        env["EFFK_CPU_ISA"] = isa
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


_SUBNORMAL = """
    import torch
    from effkernels import ops
    # y = x @ w^T with an identity BatchNorm: one subnormal x times weights of 1.
    x = torch.full((1, 2, 3, 3), 1e-39, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.ones(16, 2, 1, 1, dtype=torch.bfloat16)
    one, zero = torch.ones(16, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.bfloat16)
    y = ops.pwconv_bn_act(x, w, one, zero, zero, one, act="identity", eps=0.0)
    print(float(y[0, 0, 0, 0]))
"""


def test_cpu_isa_is_the_cpus_widest_under_the_cap():
    """effkernels.cpu_isa() names the kernels that run: the widest level this CPU has, capped by
    EFFK_CPU_ISA."""
    widest = ISA_LEVELS.index(_widest_isa(_cpu_flags()))
    script = "import effkernels; print(effkernels.cpu_isa())"
    assert _python(script).strip() == ISA_LEVELS[widest]
    for cap in ISA_LEVELS:
        expected = ISA_LEVELS[min(widest, ISA_LEVELS.index(cap))]
        assert _python(script, isa=cap).strip() == expected, cap


def test_pair_kernel_runs_exactly_where_the_cpu_has_avx512_bf16():
    default = float(_python(_SUBNORMAL))
    fp32_path = float(_python(_SUBNORMAL, isa="avx512"))
    assert fp32_path == pytest.approx(2 * 1.0101904577379033e-39, rel=1e-2)
    if _cpu_has_avx512_bf16():
        assert default == 0.0, "the bf16 pair kernel did not run on an AVX-512 BF16 CPU"
    else:
        assert default == fp32_path, "the bf16 pair kernel ran on a CPU without AVX-512 BF16"


_FP32_PATH = """
    import torch
    from tests.opcase import check_op
    from tests.test_ops import PW_SHAPES, pw_case, _block_diagonal_case
    torch.manual_seed(0)
    for shape in PW_SHAPES:
        for training in (True, False):
            check_op("pwconv_bn_act", *pw_case(shape, torch.bfloat16, "channels_last",
                                               training=training), "cpu", torch.bfloat16)
    for training in (True, False):
        check_op("pwconv_bn_act", *_block_diagonal_case(torch.bfloat16, training), "cpu",
                 torch.bfloat16)
    from tests.test_cpu_bf16 import check_block_bf16, check_rounded_like_fp32
    for case in ("mbv2_s1_skip", "no_expand_se_skip", "odd_7x11_s2_se", "dil2_k5_s2_se"):
        check_block_bf16(case)
    check_rounded_like_fp32()
    from tests.test_cpu_bf16 import check_gemm_to_one_rounding
    check_gemm_to_one_rounding()
    print("ok")
"""


def assert_fp32_rounded(y, y32, what):
    """y (bf16) is y32 (fp32) rounded by PyTorch, bit for bit (any NaN where y32 has one)."""
    assert y.dtype == torch.bfloat16
    expected = y32.bfloat16()
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert same.all(), f"{what}: {(~same).sum().item()} of {y.numel()} differ"


def check_rounded_like_fp32():
    """On the fp32 path a bf16 call computes exactly what the fp32 op computes on the widened
    values, so its output is that result rounded by PyTorch, bit for bit: the epilogues' vector
    rounding (store_bf16_row) against c10's, with residuals, activations and channel tails."""
    from tests.test_inverted_residual_cpu import _args, _cast, _fused
    torch.manual_seed(1)

    x = make_input((2, 40, 9, 11), torch.bfloat16, "channels_last")
    x[1, 5, 2, 3] = float("nan")
    w = conv_weight((37, 40, 1, 1), torch.bfloat16)
    res = make_input((2, 37, 9, 11), torch.bfloat16, "channels_last")
    g, b, rm, rv = bn_params(37)
    for act in ("relu6", "hswish", "silu", "identity"):
        for r in (None, res):
            with torch.no_grad():
                y = ops.pwconv_bn_act(x, w, g, b, rm, rv, act=act, residual=r)
                y32 = ops.pwconv_bn_act(x.float(), w.float(), g, b, rm, rv, act=act,
                                        residual=None if r is None else r.float())
            assert_fp32_rounded(y, y32, f"pwconv {act} residual={r is not None}")
    for case in ("mbv2_s1_skip", "odd_7x11_s2_se"):
        x64, block64, kw = _args(case, torch.float64, "channels_last")
        xb, block = x64.bfloat16(), _cast(block64, torch.bfloat16)
        assert_fp32_rounded(_fused(xb, block, kw),
                  _fused(xb.float(), _cast(block, torch.float32), kw), case)


def check_gemm_to_one_rounding():
    """y = x @ w^T through pwconv_bn_act with an identity BatchNorm (scale exactly 1, shift 0)
    and activation: the fp32 sum of the bf16 products, rounded once to bf16. Against the float64
    product: within half a bf16 ulp plus the fp32 summation's error (bounded by 2^-16 of
    |x| @ |w| for these K), so a lost product (~1/K of that sum), a lost row, an unwritten or a
    doubly counted element fails. At every tail the GEMM kernels have: K below, at and past a
    multiple of 32 (AMX's tile) and of 2 (the pairs), odd K; 1 to 135 pixel rows (16-row tiles,
    12-row blocks); 16 to 130 output channels (16/32/48-column panels); in-place NHWC rows,
    strided rows and NCHW input (copied tiles). An Inf and a NaN in the last k and the last
    pixel reach their outputs as in float64."""
    torch.manual_seed(3)
    for cin in (1, 2, 13, 31, 32, 33, 64, 95, 96, 200):
        for cout in (16, 24, 48, 96, 130):
            w = conv_weight((cout, cin, 1, 1), torch.bfloat16)
            one, zero = torch.ones(cout), torch.zeros(cout)
            for i, (n, h, wd) in enumerate(((1, 1, 1), (1, 7, 11), (2, 16, 3), (3, 5, 9))):
                layout = ("channels_last", "strided_cl", "contiguous")[(cin + cout + i) % 3]
                x = make_input((n, cin, h, wd), torch.bfloat16, layout)
                if i == 3:
                    x[0, cin - 1, 0, 0] = float("inf")
                    x[n - 1, 0, h - 1, wd - 1] = float("nan")
                with torch.no_grad():
                    y = ops.pwconv_bn_act(x, w, one, zero, zero, one, act="identity", eps=0.0)
                xd, wm = x.double().permute(0, 2, 3, 1), w.double()[:, :, 0, 0]
                ref = (xd @ wm.T).permute(0, 3, 1, 2)
                bound = 2.0 ** -8 * ref.abs() + 2.0 ** -16 * (xd.abs() @ wm.abs().T).permute(
                    0, 3, 1, 2)
                what = f"Cin {cin} Cout {cout} x {tuple(x.shape)} {layout}"
                yd = y.double()
                assert torch.equal(yd.isnan(), ref.isnan()), what
                finite = ref.isfinite()
                assert torch.equal(yd[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()]), what
                err = (yd - ref).abs()[finite]
                worst = (err - bound[finite]).max().item()
                assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g}"


def test_bf16_gemm_to_one_rounding():
    """The bf16 GEMM this CPU runs (AMX's, the pair kernel or the fp32 path)."""
    check_gemm_to_one_rounding()


_PAIR_PATH = """
    import torch
    import effkernels
    assert effkernels.cpu_isa() == "avx512bf16", effkernels.cpu_isa()
    from tests.opcase import check_op
    from tests.test_ops import PW_SHAPES, pw_case
    from tests.test_cpu_bf16 import check_block_bf16, check_gemm_to_one_rounding
    torch.manual_seed(0)
    for shape in PW_SHAPES:
        for training in (True, False):
            check_op("pwconv_bn_act", *pw_case(shape, torch.bfloat16, "channels_last",
                                               training=training), "cpu", torch.bfloat16)
    for case in ("mbv2_s1_skip", "no_expand_se_skip", "odd_7x11_s2_se", "dil2_k5_s2_se"):
        check_block_bf16(case)
    check_gemm_to_one_rounding()
    print("ok")
"""


@pytest.mark.skipif(_widest_isa(_cpu_flags()) != "amx",
                    reason="only an AMX CPU runs another bf16 GEMM than the pair kernel")
def test_bf16_pair_kernel_on_an_amx_cpu():
    """On a CPU with AMX the tile kernel runs by default; the pair kernel (forced with
    EFFK_CPU_ISA=avx512bf16) stays correct there too."""
    assert _python(_PAIR_PATH, isa="avx512bf16").strip().endswith("ok")


def test_bf16_on_the_fp32_path():
    """bf16 where the CPU has no AVX-512 BF16 (forced here): x tiles and weights converted to
    fp32, the FMA kernel; the same checks as the default path's in test_ops and below."""
    assert _python(_FP32_PATH, isa="avx512").strip().endswith("ok")


def _pw_fwd_bwd(x, w, bn, training):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    g, b = (t.detach().requires_grad_() for t in bn[:2])
    rm, rv = (t.clone() for t in bn[2:])
    y = ops.pwconv_bn_act(x, w, g, b, rm, rv, act="hswish", training=training)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return [y.detach(), x.grad, w.grad, g.grad, b.grad, rm, rv]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cin", [40, 41], ids=["cin40", "cin41"])
def test_bf16_bitwise_independent_of_threads(cin, training):
    torch.manual_seed(0)
    x = make_input((4, cin, 13, 15), torch.bfloat16, "channels_last")
    w = conv_weight((72, cin, 1, 1), torch.bfloat16)
    bn = [t.bfloat16() for t in bn_params(72)]
    runs = per_thread_count(lambda: _pw_fwd_bwd(x, w, bn, training))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cin,cout,res", [(40, 72, False), (96, 24, True), (13, 33, False)])
def test_bf16_backward_has_the_fp32_ops_precision(cin, cout, res):
    """The bf16 backward keeps fp32's precision (its dx and dweight GEMMs take the fp32 dy): the
    gradients of x, W, gamma, beta and the residual are those of the fp32 op on the same values,
    rounded once to bf16 (a rounding tie may flip: one bf16 ulp). The guard for moving those
    GEMMs to bf16 kernels: a dy rounded to bf16 is 2^-9 off, a split into hi + lo ~2^-17."""
    torch.manual_seed(cin + cout)
    x = make_input((4, cin, 13, 15), torch.bfloat16, "channels_last")
    w = conv_weight((cout, cin, 1, 1), torch.bfloat16)
    bn = [t.bfloat16() for t in bn_params(cout)]
    r = make_input((4, cout, 13, 15), torch.bfloat16, "channels_last") if res else None
    go = make_input((4, cout, 13, 15), torch.bfloat16, "channels_last")

    def grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_()
                  for t in [x, w, bn[0], bn[1]] + ([r] if res else [])]
        rm, rv = (t.to(dtype) for t in bn[2:])
        y = ops.pwconv_bn_act(leaves[0], leaves[1], leaves[2], leaves[3], rm, rv, act="hswish",
                              residual=leaves[4] if res else None, training=True)
        y.backward(go.to(dtype))
        return [t.grad for t in leaves]

    names = ["x", "weight", "bn_weight", "bn_bias", "residual"]
    for name, got, exact in zip(names, grads(torch.bfloat16), grads(torch.float32)):
        assert got.dtype == torch.bfloat16
        exact = exact.double()
        mag = exact.abs().clamp_min(1e-30)
        one_ulp = 2.0 ** (torch.floor(torch.log2(mag)) - 7) + 1e-6 * exact.abs().max()
        err = (got.double() - exact).abs()
        worst = (err / one_ulp).max().item()
        assert worst <= 1.0, f"{name}: {worst:.2f} bf16 ulps from the fp32 op's gradient"


def test_bf16_nan_reaches_its_pixel_with_block_diagonal_weight():
    """The pair kernel skips zero weights in k pairs: a NaN in x still reaches every output
    channel of its pixel, as with the fp32 kernel (0 * NaN = NaN)."""
    from .test_ops import _block_diagonal_case
    tensors, kwargs = _block_diagonal_case(torch.bfloat16, False, groups=((7, 40), (13, 9)))
    tensors["x"] = tensors["x"].clone()
    tensors["x"][1, 3, 4, 5] = float("nan")
    with torch.no_grad():
        y = ops.pwconv_bn_act(**tensors, **kwargs)
    assert torch.isnan(y[1, :, 4, 5]).all()
    y[1, :, 4, 5] = 0
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2), (7, 1), (9, 2), (3, 2)])
def test_bf16_depthwise_eval_is_the_fp32_result_rounded(k, stride):
    """bf16 inference runs the fp32 fast path's code on widened bf16 loads and rounds the fp32
    result like c10::BFloat16 (nearest even, NaN stays NaN): bit for bit the fp32 op's output on
    the same (widened) values, rounded by PyTorch. Interior tiles, edge tiles, the channel tail
    (C = 37), NaN and infinities in x."""
    torch.manual_seed(k * 10 + stride)
    x = make_input((2, 37, 19, 23), torch.bfloat16, "channels_last")
    x[0, 3, 5, 7] = float("nan")
    x[1, 30, 2, 2] = float("inf")
    x[1, 31, 10, 11] = -float("inf")
    w = conv_weight((37, 1, k, k), torch.bfloat16)
    g, b, rm, rv = bn_params(37)
    for act in ("relu6", "hswish", "silu", "identity"):
        with torch.no_grad():
            y = ops.dwconv_bn_act(x, w, g, b, rm, rv, stride=stride, act=act)
            y32 = ops.dwconv_bn_act(x.float(), w.float(), g, b, rm, rv, stride=stride, act=act)
        assert_fp32_rounded(y, y32, act)
        assert y.isnan().any()


def check_block_bf16(case, n=None):
    """The fused inference block in bf16 against the float64 reference, within the error of
    PyTorch's own bf16 block (x and the weights are the bf16 values)."""
    from .helpers import assert_lowp_close
    from .test_inverted_residual_cpu import _args, _cast, _fused, _ref
    x64, block64, kw = _args(case, torch.float64, "channels_last")
    if n is not None:
        x64 = torch.cat([x64] * n)[:n].contiguous(memory_format=torch.channels_last)
    x, block = x64.bfloat16(), _cast(block64, torch.bfloat16)
    out = _fused(x, block, kw)
    assert out.dtype == torch.bfloat16
    ref64 = _ref(x.double(), _cast(block, torch.float64), kw)
    assert_lowp_close(out, ref64, _ref(x, block, kw), torch.bfloat16, case)
    return x, block, kw


def _block_cases():
    from .test_inverted_residual_cpu import CASES
    return list(CASES)


@pytest.mark.parametrize("n", [None, 1], ids=["N", "N1"])
@pytest.mark.parametrize("case", _block_cases())
def test_bf16_fused_block(case, n):
    """Every block shape of the fused-kernel tests (one- and two-phase, SE, no expand stage,
    odd channel counts, channel slices at N=1) in bf16."""
    check_block_bf16(case, n)


@pytest.mark.parametrize("case", ["mbv2_s1_skip", "k5_s1_se_skip", "odd_7x11_s2_se",
                                  "wide_7x7_960"])
@pytest.mark.parametrize("n", [1, 3])
def test_bf16_fused_block_bitwise_independent_of_threads(case, n):
    from .test_inverted_residual_cpu import _fused
    x, block, kw = check_block_bf16(case, n)
    outs = per_thread_count(lambda: _fused(x, block, kw))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16_pwconv_shapes_and_weight_views(training):
    """The pair kernel on every pointwise test shape (Cin = 1, 3, 13: odd k tails), and on
    weights that are views: a column slice of a wider weight with an odd row stride (packed
    element by element) and one with an even row stride (packed as 32-bit words)."""
    from .opcase import check_op
    from .test_ops import PW_SHAPES, pw_case
    torch.manual_seed(2)
    for shape in PW_SHAPES:
        check_op("pwconv_bn_act", *pw_case(shape, torch.bfloat16, "channels_last",
                                           training=training), "cpu", torch.bfloat16)
    for wide in (41, 42):
        tensors, kwargs = pw_case((2, 24, 20, 7, 9, True), torch.bfloat16, "channels_last",
                                  training=training)
        tensors["weight"] = conv_weight((20, wide, 1, 1), torch.bfloat16)[:, 3:27]
        assert tensors["weight"].stride(0) == wide
        check_op("pwconv_bn_act", tensors, kwargs, "cpu", torch.bfloat16)
