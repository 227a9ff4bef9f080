"""backends/jittor_impl/conv.py: the GEMM routes of Conv2d against a float64 numpy
convolution and against Jittor's own ``mkl_conv`` (forward and all gradients)."""
from __future__ import annotations

import numpy as np
import pytest

from backends.jittor_impl import conv as jconv
from backends.jittor_impl import framework as fw

jt = fw.jt
pytestmark = pytest.mark.jittor


def conv_ref(x, w, b, stride, pad):
    """float64 numpy conv2d: x [N, C, H, W], w [O, C, kh, kw] -> [N, O, oh, ow], zero padding."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]   # [N, C, oh, ow]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


def _module(c, o, k, stride, pad, bias, rng):
    m = jconv.Conv2d(c, o, k, stride, padding=pad, bias=bias)
    fw.assign(m.weight, rng.normal(0, 0.3, m.weight.shape), "float32")
    if bias:
        fw.assign(m.bias, rng.normal(0, 0.3, m.bias.shape), "float32")
    return m


def _run(m, x, g, route_fn):
    """(y, dx, dw, db) of sum(conv(x) * g) through ``route_fn``."""
    y = route_fn(m, x)
    params = [x, m.weight] + ([m.bias] if m.bias is not None else [])
    grads = jt.grad((y * g).sum(), params)
    return [fw.to_numpy(t) for t in [y] + list(grads)]


CASES = [  # (N, C, H, W, O, k, stride, pad, bias, route)
    (1, 16, 9, 13, 24, 1, 1, 0, False, "1x1"),
    (2, 16, 9, 13, 24, 1, 1, 0, True, "1x1"),
    (1, 3, 17, 22, 8, 3, 2, 1, False, "im2col"),      # the stem: odd sizes, border taps
    (2, 3, 16, 21, 8, 3, 2, 1, True, "im2col"),
    (2, 3, 10, 11, 5, 3, 1, 1, False, "im2col"),
    (2, 40, 9, 12, 6, 1, 2, 0, True, "im2col"),       # 1x1 stride 2 (ResNet a/b shortcuts)
    (2, 24, 5, 7, 40, 3, 1, 1, False, "im2col"),      # a small map: 40 channels >= 35 pixels
    (1, 24, 9, 7, 40, 3, 2, 1, True, "im2col"),       # stride 2: 5 x 4 output pixels
]


@pytest.mark.parametrize("n,c,h,w,o,k,stride,pad,bias,route", CASES)
def test_gemm_route_matches_float64_and_mkl_conv(n, c, h, w, o, k, stride, pad, bias, route):
    rng = np.random.default_rng(n * 100 + c + k)
    m = _module(c, o, k, stride, pad, bias, rng)
    x_np = rng.normal(0, 1, (n, c, h, w))
    x = fw.from_numpy(x_np, "float32")
    assert jconv._route(m, x) == route
    y_ref = conv_ref(x_np.astype(np.float32).astype(np.float64), fw.to_numpy(m.weight).astype(np.float64),
                     None if m.bias is None else fw.to_numpy(m.bias).astype(np.float64), stride, pad)
    g_np = rng.normal(0, 1, y_ref.shape)
    g = fw.from_numpy(g_np, "float32")
    gemm = _run(m, x, g, lambda mod, v: jconv.conv2d_gemm(mod, v, route))
    mkl = _run(m, x, g, lambda mod, v: jt.nn.Conv2d.execute(mod, v))
    scale = np.abs(y_ref).max()
    np.testing.assert_allclose(gemm[0], y_ref, atol=2e-6 * scale)          # float32 rounding only
    for got, want in zip(gemm, mkl):                                       # y, dx, dw (, db)
        np.testing.assert_allclose(got, want, atol=2e-6 * max(1.0, np.abs(want).max()))
    # the exact float64 gradient of sum(y * g) w.r.t. x: conv_transpose of g, checked via a probe
    probe = rng.normal(0, 1, x_np.shape)
    eps_dir = float((gemm[1] * probe).sum())
    w64 = fw.to_numpy(m.weight).astype(np.float64)
    exact = float((conv_ref(probe, w64, None, stride, pad) * g_np.astype(np.float32)).sum())
    assert abs(eps_dir - exact) <= 1e-5 * max(1.0, abs(exact))


def test_routes_left_to_mkl_conv(monkeypatch):
    rng = np.random.default_rng(0)
    wide = _module(64, 8, 3, 1, 1, False, rng)                             # 576 rows, 8 < 36 pixels
    x32 = fw.from_numpy(rng.normal(0, 1, (1, 64, 6, 6)), "float32")
    assert jconv._route(wide, x32) == "mkl"
    one = _module(16, 8, 1, 1, 0, False, rng)
    assert jconv._route(one, fw.from_numpy(rng.normal(0, 1, (1, 16, 4, 4)), "float64")) == "mkl"
    grouped = jconv.Conv2d(16, 8, 1, groups=2, bias=False)
    x16 = fw.from_numpy(rng.normal(0, 1, (1, 16, 4, 4)), "float32")
    assert jconv._route(grouped, x16) == "mkl"
    assert jconv._route(one, x16) == "1x1"
    monkeypatch.setattr(jconv, "CONV_IMPL", "mkl")                          # RTDETR_JITTOR_CONV=mkl
    assert jconv._route(one, x16) == "mkl"


def test_float64_conv_is_unchanged_and_exact():
    rng = np.random.default_rng(1)
    m = _module(3, 4, 3, 2, 1, True, rng)
    for var in (m.weight, m.bias):
        fw.assign(var, rng.normal(0, 0.3, var.shape), "float64")
    x_np = rng.normal(0, 1, (2, 3, 9, 10))
    y = fw.to_numpy(m(fw.from_numpy(x_np, "float64")))
    want = conv_ref(x_np, fw.to_numpy(m.weight), fw.to_numpy(m.bias), 2, 1)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-13 * np.abs(want).max())


def test_one_by_one_conv_runs_as_gemm_forward_and_backward():
    """No ``mkl_conv*`` kernel in a 1x1 conv's forward + backward: only ``mkl_matmul``."""
    rng = np.random.default_rng(2)
    m = _module(16, 24, 1, 1, 0, False, rng)
    x = fw.from_numpy(rng.normal(0, 1, (1, 16, 8, 8)), "float32")
    with jt.profile_scope() as report:
        y = m(x)
        jt.sync(jt.grad((y * y).sum(), [x, m.weight]))
        jt.sync_all(True)
    ops = [row[0] for row in report[1:]]
    assert not [op for op in ops if op.startswith("mkl_conv")]
    assert sum(int(row[2]) for row in report[1:] if row[0].startswith("mkl_matmul")) == 3
