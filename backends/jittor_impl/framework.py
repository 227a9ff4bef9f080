"""The one place where Jittor's differences from PyTorch are handled.

Every measured parity pitfall of ``backends/jittor_pitfalls.md`` that RT-DETR
touches is dealt with here, and every other file of this backend uses these helpers
instead of the raw Jittor call.  Three layers that need more than a helper have files of
their own: ``normalization`` (BatchNorm2d, LayerNorm), ``attention`` (MultiheadAttention)
and ``optim`` (AdamW).  Each helper has its own test against recorded PyTorch
values (tests/test_jittor_pitfalls.py, data in tests/data/pitfalls/).

Import guard (must run before anything else imports jittor):
  * ``nvcc_path=""`` when no GPU driver is present: otherwise Jittor finds nvcc, takes the
    CUDA path and ``import jittor`` fails on libcudart.
  * op kernels are built with ``-O2`` instead of ``-Ofast``: fast-math breaks NaN checks,
    flushes denormals and reassociates sums (log_softmax off by 3e-5 at large logits).
    ``-fvect-cost-model=dynamic`` lets g++ vectorise the elementwise loops it skips at -O2's
    "very cheap" model (a BatchNorm affine + ReLU on [1,128,160,160]: 2.5 -> 1.1 ms, one
    thread); without fast-math, vectorising changes no result (sums stay in order).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional, Sequence

import numpy as np


def _cuda_usable() -> bool:
    """A GPU driver (libcuda) is present (nvcc and libcudart may exist without one)."""
    for name in ("libcuda.so.1", ctypes.util.find_library("cuda")):
        if name:
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                pass
    return False


if "jittor" not in sys.modules and "nvcc_path" not in os.environ and not _cuda_usable():
    os.environ["nvcc_path"] = ""          # CPU only: keep Jittor off the CUDA path
import jittor as jt  # noqa: E402
from jittor import nn  # noqa: E402

jt.flags.cc_flags = jt.flags.cc_flags.replace("-Ofast", "-O2 -fvect-cost-model=dynamic")   # IEEE kernels, like torch
from . import activation_kernels  # noqa: E402  (it imports jittor: after the guard)

NAME = "jittor"
DTYPES = {"float32": jt.float32, "float64": jt.float64}


def get_dtype(name: str):
    """'float32' | 'float64' -> Jittor dtype."""
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (float32, float64)")
    return DTYPES[name]


def set_device(device: str) -> None:
    """'cpu' or 'cuda' (global in Jittor: ``jt.flags.use_cuda``)."""
    if device == "cuda":
        if not jt.has_cuda:
            raise RuntimeError("device='cuda' requested but this Jittor has no CUDA support")
        jt.flags.use_cuda = 1
    elif device == "cpu":
        jt.flags.use_cuda = 0
    else:
        raise ValueError(f"unknown device {device!r} (cpu, cuda)")


def from_numpy(a, dtype: Optional[str] = None, device: str = "cpu") -> jt.Var:
    """numpy -> Var keeping float64 (auto_convert_64_to_32 would make it float32 silently);
    ``dtype`` casts floating arrays; ``device`` is global in Jittor.  Integer arrays become
    int32, Jittor's index type (checked to fit: int64 would wrap silently)."""
    a = np.asarray(a)
    if dtype is not None and a.dtype.kind == "f":
        return jt.array(a.astype(dtype), dtype=dtype)
    if a.dtype.kind in "iu":
        if a.size and (a.max() > np.iinfo(np.int32).max or a.min() < np.iinfo(np.int32).min):
            raise OverflowError("integer values do not fit int32 (Jittor index type)")
        return jt.array(a.astype(np.int32))
    if a.dtype == np.bool_:
        return jt.array(a)
    return jt.array(a, dtype=str(a.dtype))


def scalar(value: float, like: jt.Var):
    """``value`` for arithmetic with ``like``.  Jittor makes every Python float a float32
    constant, also in float64 graphs (x64 * 0.1 is off by 1.5e-9, x64 / sqrt(2) by 3.6e-8):
    float64 operands get an exact float64 Var; float32 ones keep the plain float (the
    same rounding, and kernels stay fused)."""
    if like.dtype == jt.float64:
        return jt.array(np.asarray(value, dtype=np.float64), dtype="float64").stop_grad()
    return value


def full_like(x: jt.Var, value: float) -> jt.Var:
    """torch.full_like, exact in float64 (``jt.full_like`` rounds value to float32)."""
    if x.dtype == jt.float64:
        return scalar(value, x).broadcast(x.shape)
    return jt.full_like(x, value).stop_grad()


def mean(x: jt.Var, dims, keepdims: bool = False) -> jt.Var:
    """x.mean(dims) as sum / count: the gradient of ``Var.mean`` multiplies by a float32
    1/n, 1.5e-9 off in float64 graphs (the forward is exact either way)."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    count = int(np.prod([x.shape[d] for d in dims]))
    return x.sum(dims=dims, keepdims=keepdims) / count


no_grad = jt.no_grad      # torch.no_grad: ops built inside record no graph for a backward


def constant(a, dtype: Optional[str] = None) -> jt.Var:
    """A Var that never receives gradients (anchors, masks, targets)."""
    return from_numpy(a, dtype).stop_grad()


def to_numpy(v) -> np.ndarray:
    return v.numpy() if isinstance(v, jt.Var) else np.asarray(v)   # (copies; syncs the graph)


def set_training(module: nn.Module, mode: bool = True) -> nn.Module:
    """Flip train/eval on every sub-module WITHOUT touching gradients.

    Jittor's ``Module.eval()`` stop-grads every parameter (and ``train()`` re-enables the
    ones it saw first), so eval-mode gradients would be zeros and parameters frozen while
    in eval would thaw.  torch's ``train(mode)`` only sets the flag: so does this."""
    def cb(parents, k, m, n):
        m.is_train = bool(mode)
    module.dfs([], None, cb, None)
    return module


def freeze(v: jt.Var) -> jt.Var:
    """Exclude a Var from autograd and from the optimiser (torch: requires_grad=False).
    Jittor's ``module.requires_grad_(False)`` only zeroes grads and AdamW still decays."""
    v.stop_grad()
    return v


def is_trainable(v: jt.Var) -> bool:
    return not v.is_stop_grad()


def update_(v: jt.Var, new: jt.Var) -> None:
    """In-place value replacement that keeps v's trainable/frozen state.  ``Var.update``
    copies the flag of ``new`` (updating a parameter with a detached value froze it)."""
    frozen = v.is_stop_grad()
    v.update(new.detach())
    v.stop_grad() if frozen else v.start_grad()


def assign(v: jt.Var, a: np.ndarray, dtype: str) -> None:
    """In-place load of ``a`` into ``v`` as ``dtype``.  ``Var.update`` adopts the array's
    dtype (int64 -> int32, float16 stays float16): the caller casts and validates first."""
    update_(v, from_numpy(np.asarray(a), dtype))


class _Sigmoid(jt.Function):
    """Stable sigmoid, torch's gradient y (1 - y).  Jittor's returns 9.36e-14 for x < -30."""

    def execute(self, x):
        if activation_kernels.use_kernel():      # the same expression, OpenMP
            self.y = activation_kernels.sigmoid(x).stop_grad()
            return self.y
        e = jt.exp(-jt.abs(x))                   # in (0, 1]: never overflows
        self.y = jt.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).stop_grad()
        return self.y

    def grad(self, g):
        return g * self.y * (1.0 - self.y)


class _LogSigmoid(jt.Function):
    """min(x, 0) - log1p(exp(-|x|)) (torch's formula), gradient sigmoid(-x).  Jittor's
    ``nn.log_sigmoid`` is log(sigmoid(x)) and floors at -30."""

    def execute(self, x):
        self.x = x.stop_grad()
        t = jt.exp(-jt.abs(x))
        u = 1.0 + t
        d = u - 1.0                              # log1p(t) accurate for tiny t (Kahan)
        log1p = jt.where(d == 0, t, jt.log(u) * (t / jt.where(d == 0, jt.ones_like(d), d)))
        return jt.where(x < 0, x, jt.zeros_like(x)) - log1p

    def grad(self, g):
        return g * _Sigmoid()(-self.x)


class _GELU(jt.Function):
    """x/2 (1 + erf(x / sqrt 2)); gradient Phi(x) + x phi(x) with dtype-exact constants."""

    def execute(self, x):
        self.x = x.stop_grad()
        self.cdf = (1.0 + jt.erf(x * scalar(1.0 / np.sqrt(2.0), x))) * 0.5
        return x * self.cdf

    def grad(self, g):
        x = self.x
        pdf = jt.exp(x * x * -0.5) * scalar(1.0 / np.sqrt(2.0 * np.pi), x)
        return g * (self.cdf + x * pdf)


class _ReLU(jt.Function):
    """max(x, 0) as ``nn.relu`` computes it; the backward keeps only the output (torch's
    threshold_backward: g where y > 0), so the input can be freed after the forward."""

    def execute(self, x):
        self.y = nn.relu(x).stop_grad()
        return self.y

    def grad(self, g):
        return jt.ternary(self.y > 0, g, jt.zeros_like(g))


def relu(x: jt.Var) -> jt.Var:
    return _ReLU()(x)


def gelu(x: jt.Var) -> jt.Var:
    return _GELU()(x)


def sigmoid(x: jt.Var) -> jt.Var:
    return _Sigmoid()(x)


def log_sigmoid(x: jt.Var) -> jt.Var:
    return _LogSigmoid()(x)


def abs_(x: jt.Var) -> jt.Var:
    return jt.where(x > 0, x, jt.where(x < 0, -x, x * 0.0))   # torch grad sign(x): 0 at 0 (jittor 1)


def clamp(x: jt.Var, min: Optional[float] = None, max: Optional[float] = None) -> jt.Var:
    """torch.clamp: gradient passes where min <= x <= max (boundaries included; Jittor's
    clamp gives 0 there)."""
    if min is not None:
        x = jt.where(x < scalar(min, x), full_like(x, min), x)
    if max is not None:
        x = jt.where(x > scalar(max, x), full_like(x, max), x)
    return x


def _bcast(a: jt.Var, b: jt.Var):
    shape = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    return a.broadcast(shape), b.broadcast(shape)


def maximum(a: jt.Var, b: jt.Var) -> jt.Var:
    """torch.max(a, b): on ties the gradient is split 0.5/0.5 (Jittor gives it to one)."""
    a, b = _bcast(a, b)
    return jt.where(a > b, a, jt.where(a < b, b, (a + b) * 0.5))


def minimum(a: jt.Var, b: jt.Var) -> jt.Var:
    a, b = _bcast(a, b)                      # torch.min(a, b), same tie rule
    return jt.where(a < b, a, jt.where(a > b, b, (a + b) * 0.5))


def softmax(x: jt.Var, dim: int) -> jt.Var:
    """Always pass dim: ``nn.softmax(x)`` without dim normalises over the whole tensor."""
    return nn.softmax(x, dim=dim)


def bce_with_logits(x: jt.Var, target, weight=None) -> jt.Var:
    """Elementwise (reduction='none', absent in Jittor): (1 - t) x - log_sigmoid(x), times
    weight, exactly torch's formula."""
    loss = (1 - target) * x - log_sigmoid(x)
    return loss if weight is None else loss * weight


def topk(x: jt.Var, k: int, dim: int = -1):
    """(values, int32 indices), descending.  Tie order differs from torch (argsort based):
    parity runs inject indices from one side (``topk_index``)."""
    return jt.topk(x, k, dim=dim)


def max_values(x: jt.Var, dim: int) -> jt.Var:
    """torch ``x.max(dim).values`` (``jt.max(x, dim)`` returns values only)."""
    return jt.max(x, dim)


def argmax(x: jt.Var, dim: int = -1) -> jt.Var:
    """torch ``x.argmax(dim)`` (``jt.argmax`` returns (index, value))."""
    return jt.argmax(x, dim)[0]


def gather_rows(x: jt.Var, index: jt.Var) -> jt.Var:
    """x [B, S, C], index [B, K] -> [B, K, C] (torch gather on dim 1 with a repeated index).
    Out-of-range indices are not checked by Jittor: the caller validates them."""
    b, k = index.shape
    return x.reindex([b, k, x.shape[2]], ["i0", "@e0(i0,i1)", "i2"], extras=[index])


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's nearest source index: floor(i * float32(in/out)) (Jittor's own rule
    floor(i*in/out) picks other rows at e.g. x0.7)."""
    if n_in == n_out:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def interpolate_nearest(x: jt.Var, size: Sequence[int]) -> jt.Var:
    """F.interpolate(x, size=size, mode='nearest') with torch's index rule; x [N, C, H, W].
    (Jittor's interpolate defaults to bilinear.)"""
    n, c, h, w = x.shape
    oh, ow = int(size[0]), int(size[1])
    ih, iw = constant(_nearest_index(h, oh)), constant(_nearest_index(w, ow))
    return x.reindex([n, c, oh, ow], ["i0", "i1", "@e0(i2)", "@e1(i3)"], extras=[ih, iw])


def grid_sample(value: jt.Var, grid: jt.Var) -> jt.Var:
    """F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)
    (Jittor's reindex version matches torch to 1e-7, forward and both gradients)."""
    return nn.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Embedding(nn.Module):
    """nn.Embedding(num, dim, padding_idx): the padding row is looked up like any other
    (its value is whatever was loaded) but, as in torch, never receives gradient (Jittor
    only zeroes it at init)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.weight = jt.zeros((num_embeddings, embedding_dim))

    def execute(self, idx: jt.Var) -> jt.Var:
        w, p = self.weight, self.padding_idx
        if p is not None:
            w = jt.concat([w[:p], w[p:p + 1].stop_grad(), w[p + 1:]], dim=0)
        return w[idx]
