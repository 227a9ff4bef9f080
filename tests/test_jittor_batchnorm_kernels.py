"""backends/jittor_impl/batchnorm_kernels.py: train-mode BatchNorm2d through the CPU kernels
against the Jittor-ops path (RTDETR_JITTOR_BN=ops) and against float64 numpy."""
from __future__ import annotations

import numpy as np
import pytest

from backends.jittor_impl import batchnorm_kernels as bk
from backends.jittor_impl import framework as fw
from backends.jittor_impl.normalization import BatchNorm2d

jt = fw.jt
pytestmark = pytest.mark.jittor

SHAPES = [(2, 5, 7, 9), (1, 3, 1, 1), (3, 4, 5, 3), (1, 6, 33, 17)]


def _train_step(impl, dtype, x_np, g_np, w_np, b_np, monkeypatch):
    """(y, dx, dweight, dbias, running_mean, running_var) of one train-mode call."""
    monkeypatch.setattr(bk, "BN_IMPL", impl)
    bn = BatchNorm2d(x_np.shape[1])
    fw.assign(bn.weight, w_np, dtype)
    fw.assign(bn.bias, b_np, dtype)
    fw.assign(bn.running_mean, np.zeros(x_np.shape[1]), dtype)
    fw.assign(bn.running_var, np.ones(x_np.shape[1]), dtype)
    x, g = fw.from_numpy(x_np, dtype), fw.from_numpy(g_np, dtype)
    y = bn(x)
    dx, dw, db = jt.grad((y * g).sum(), [x, bn.weight, bn.bias])
    return [fw.to_numpy(t) for t in (y, dx, dw, db, bn.running_mean, bn.running_var)]


def _numpy_reference(x, g, w, b):
    """float64 train-mode BatchNorm: y, dx, dw, db, running mean and var (momentum 0.1)."""
    n = x.size // x.shape[1]
    mu = x.mean((0, 2, 3))
    var = ((x - mu.reshape(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = (x - mu.reshape(1, -1, 1, 1)) * invstd.reshape(1, -1, 1, 1)
    y = xhat * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
    sg, sgx = g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))
    dx = (w * invstd).reshape(1, -1, 1, 1) * (g - (sg / n).reshape(1, -1, 1, 1) - xhat * (sgx / n).reshape(1, -1, 1, 1))
    rv = 0.9 + 0.1 * var * n / max(n - 1, 1)
    return [y, dx, sgx, sg, 0.1 * mu, rv]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_match_ops_path_and_float64(shape, dtype, monkeypatch):
    rng = np.random.default_rng(sum(shape))
    x_np, g_np = rng.normal(3, 2, shape), rng.normal(0, 1, shape)             # offset mean: two passes matter
    w_np, b_np = rng.normal(1, 0.1, shape[1]), rng.normal(0, 0.1, shape[1])
    kern = _train_step("kernel", dtype, x_np, g_np, w_np, b_np, monkeypatch)
    ops = _train_step("ops", dtype, x_np, g_np, w_np, b_np, monkeypatch)
    ref = _numpy_reference(*(np.asarray(a, dtype).astype(np.float64) for a in (x_np, g_np, w_np, b_np)))
    tol = {"float32": 1e-6, "float64": 1e-14}[dtype]
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    # y = x * scale + shift cancels: its rounding is relative to |x * weight * invstd|
    # (about 1e3 with one value per channel, where invstd = 1 / sqrt(eps))
    amplification = np.abs(x_np).max() * np.abs(w_np).max() / np.sqrt(x_np.var((0, 2, 3)).min() + 1e-5)
    for name, k, o, r in zip(names, kern, ops, ref):
        scale = max(np.abs(r).max(), 1.0, amplification if name == "y" else 1.0)
        # the same arithmetic as the ops path: only the float64 sum order (and, for dx in
        # float32, one fused multiply-add in Jittor's own kernel) differ
        assert np.abs(k - o).max() <= tol * scale, (name, np.abs(k - o).max())
        assert np.abs(k - r).max() <= {"float32": 2e-5, "float64": 1e-13}[dtype] * scale, name
    if dtype == "float32":
        for name in ("y", "dweight", "dbias", "running_mean", "running_var"):
            i = names.index(name)
            np.testing.assert_array_equal(kern[i], ops[i], err_msg=name)


def test_kernels_are_used_on_cpu_and_run_twice_to_the_same_bits(monkeypatch):
    rng = np.random.default_rng(5)
    x_np, g_np = rng.normal(0, 1, (2, 8, 12, 10)), rng.normal(0, 1, (2, 8, 12, 10))
    args = (x_np, g_np, np.ones(8), np.zeros(8))
    assert bk.use_kernels()
    with jt.profile_scope() as report:
        first = _train_step("kernel", "float32", *args, monkeypatch)
    assert sum(1 for row in report[1:] if row[0].startswith("code")) >= 2       # moments + backward
    second = _train_step("kernel", "float32", *args, monkeypatch)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
