"""backends/jittor_impl/softmax_kernels.py: the attention softmax kernel against the Jittor-ops
path (RTDETR_JITTOR_SOFTMAX=ops) and float64 numpy, forward and gradient."""
from __future__ import annotations

import numpy as np
import pytest

from backends.jittor_impl import framework as fw
from backends.jittor_impl import softmax_kernels as sk
from backends.jittor_impl.attention import MultiheadAttention

jt = fw.jt
pytestmark = pytest.mark.jittor


def _numpy_softmax(x, mask, g):
    """float64 (y, dx) of sum(softmax(x masked) * g); mask True = blocked."""
    v = np.where(mask, -np.inf, x)
    e = np.exp(v - v.max(-1, keepdims=True))
    y = e / e.sum(-1, keepdims=True)
    return y, y * (g - (g * y).sum(-1, keepdims=True))


def _run(impl, x_np, mask_np, g_np, dtype, monkeypatch):
    monkeypatch.setattr(sk, "SOFTMAX_IMPL", impl)
    m = MultiheadAttention(4, 1)
    x, g = fw.from_numpy(x_np, dtype), fw.from_numpy(g_np, dtype)
    mask = None if mask_np is None else fw.constant(mask_np)
    y = m._probs(x, mask)
    return fw.to_numpy(y), fw.to_numpy(jt.grad((y * g).sum(), x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,masked", [((7, 11), True), ((2, 3, 5, 9), True), ((37, 500), False)])
def test_kernel_matches_ops_path_and_float64(shape, masked, dtype, monkeypatch):
    rng = np.random.default_rng(shape[-1])
    x_np, g_np = rng.normal(0, 3, shape), rng.normal(0, 1, shape)
    mask_np = None
    if masked:
        mask_np = rng.random(shape[-2:]) < 0.4
        mask_np[:, 0] = False                                  # no row fully blocked
    kern = _run("kernel", x_np, mask_np, g_np, dtype, monkeypatch)
    ops = _run("ops", x_np, mask_np, g_np, dtype, monkeypatch)
    ref = _numpy_softmax(np.asarray(x_np, dtype).astype(np.float64),
                         np.zeros(shape, bool) if mask_np is None else np.broadcast_to(mask_np, shape),
                         np.asarray(g_np, dtype).astype(np.float64))
    tol = {"float32": 2e-6, "float64": 1e-14}[dtype]
    for name, k, o, r in zip(("y", "dx"), kern, ops, ref):
        assert np.abs(k - o).max() <= tol, (name, np.abs(k - o).max())
        assert np.abs(k - r).max() <= tol, (name, np.abs(k - r).max())
    if mask_np is not None:
        assert (kern[0][np.broadcast_to(mask_np, shape)] == 0).all()   # blocked: exactly 0


def test_fully_blocked_row_is_nan_like_the_ops_path(monkeypatch):
    x_np, g_np = np.zeros((2, 3)), np.ones((2, 3))
    mask_np = np.array([[True, True, True], [False, True, False]])
    kern = _run("kernel", x_np, mask_np, g_np, "float32", monkeypatch)
    ops = _run("ops", x_np, mask_np, g_np, "float32", monkeypatch)
    np.testing.assert_array_equal(np.isnan(kern[0]), np.isnan(ops[0]))
    assert np.isnan(kern[0][0]).all() and not np.isnan(kern[0][1]).any()


def test_attention_uses_the_kernel_and_is_deterministic(monkeypatch):
    rng = np.random.default_rng(3)
    m = MultiheadAttention(8, 2)
    for var in (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias):
        fw.assign(var, rng.normal(0, 0.5, var.shape), "float32")
    q = fw.from_numpy(rng.normal(0, 1, (2, 6, 8)), "float32")
    mask = fw.constant(rng.random((6, 6)) < 0.3)
    outs = []
    for _ in range(2):
        with jt.profile_scope() as report:
            y, _ = m(q, q, q, attn_mask=mask)
            dq = jt.grad((y * y).sum(), q)
            jt.sync([y, dq])
        outs.append((fw.to_numpy(y), fw.to_numpy(dq)))
        assert sum(int(r[2]) for r in report[1:] if r[0].startswith("code")) >= 2 * 2 * 2   # fwd + bwd per (b, h)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
