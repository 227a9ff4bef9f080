"""BatchNorm2d and LayerNorm with torch's CPU arithmetic (Jittor's own take E[x^2] - E[x]^2 in
float32 and keep a biased running variance; backends/jittor_pitfalls.md sections 3 and 20).

Train-mode BatchNorm: two-pass float64 statistics, the unbiased running-variance update, and
torch's analytic backward with float64 channel sums (``_BatchNormTrain``); on CPU the sums run
as ``batchnorm_kernels`` (``RTDETR_JITTOR_BN``).  Mirrors ``backends/torch_impl/normalization.py``.
"""
from __future__ import annotations

from jittor import nn

from . import batchnorm_kernels
from .framework import jt, mean, scalar, update_


def batchnorm_affine(x, weight, bias, mu, invstd):
    """``x * scale + shift`` with scale = weight * invstd, shift = bias - mu * scale: x
    [N, C, H, W]; weight, bias, mu, invstd [C] (torch's CPU BatchNorm arithmetic)."""
    scale = weight * invstd
    shift = bias - mu * scale
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _BatchNormTrain(jt.Function):
    """Train-mode ``y = x * scale + shift`` (scale = weight * invstd, shift = bias - mean * scale,
    the statistics computed and detached by the caller) with torch's analytic backward:
    dx = weight * invstd * (g - sum(g)/n - xhat * sum(g * xhat)/n), dweight = sum(g * xhat),
    dbias = sum(g).  Why not autodiff: Jittor's float32 reductions accumulate naively, so a
    per-channel sum over N*H*W values that cancels (the bias of a BN followed by another
    train-mode BN has exact gradient 0) left a residue 11x torch's on parity-r50vd's
    encoder.input_proj.0 (12,800 terms): here the two channel sums run in float64; the
    elementwise dx stays in x's dtype.  Shapes: x, g [N, C, H, W]; weight, bias, mean,
    invstd [C]."""

    def execute(self, x, weight, bias, mu, invstd):
        self.saved = (x, weight, mu, invstd)
        return batchnorm_affine(x, weight, bias, mu, invstd)

    def grad(self, g):
        x, weight, mu, invstd = self.saved
        if batchnorm_kernels.use_kernels():                                 # the same arithmetic
            dx, sum_g, sum_gx = batchnorm_kernels.backward(g, x, mu, invstd, weight)
            return dx, sum_gx.cast(weight.dtype), sum_g.cast(weight.dtype), None, None
        c = (1, -1, 1, 1)
        n = scalar(float(x.numel() // x.shape[1]), mu.float64())           # exact count
        xhat = (x - mu.reshape(c)) * invstd.reshape(c)                     # x's dtype
        gd = g.float64()
        sum_g = gd.sum([0, 2, 3])
        sum_gx = (gd * xhat.float64()).sum([0, 2, 3])
        a, b = (sum_g / n).cast(x.dtype), (sum_gx / n).cast(x.dtype)
        dx = (g - a.reshape(c) - xhat * b.reshape(c)) * (weight * invstd).reshape(c)
        return dx, sum_gx.cast(weight.dtype), sum_g.cast(weight.dtype), None, None


class BatchNorm2d(nn.Module):
    """torch BatchNorm2d (momentum 0.1, eps 1e-5); keys weight, bias, running_mean,
    running_var; num_batches_tracked is the int ``_num_batches_tracked`` (the adapter
    exports it as int64).  Jittor's BN takes var = E[x^2] - E[x]^2 in float32 (garbage at
    large means) and keeps a biased running_var.  Here, like torch's CPU kernel: two-pass
    float64 statistics, unbiased running_var update, y = x * scale + shift; in train mode
    torch's analytic backward with float64 channel sums (``_BatchNormTrain``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = jt.ones(num_features)
        self.bias = jt.zeros(num_features)
        self.running_mean = jt.zeros(num_features).stop_grad()
        self.running_var = jt.ones(num_features).stop_grad()
        self._num_batches_tracked = 0

    def execute(self, x: jt.Var) -> jt.Var:
        # x [N, C, H, W]
        if self.is_training():
            mu, var = self._moments(x.detach())                            # float64 [C]
            n = x.numel() // x.shape[1]
            m, keep = scalar(self.momentum, mu), scalar(1 - self.momentum, mu)
            unbias = scalar(n / max(n - 1, 1), mu)
            rm = keep * self.running_mean.float64() + m * mu
            rv = keep * self.running_var.float64() + m * (var * unbias)
            update_(self.running_mean, rm.cast(self.running_mean.dtype))
            update_(self.running_var, rv.cast(self.running_var.dtype))
            self._num_batches_tracked += 1
            invstd = (1.0 / jt.sqrt(var + scalar(self.eps, var))).cast(x.dtype)
            return _BatchNormTrain.apply(x, self.weight, self.bias, mu.cast(x.dtype), invstd.detach())
        invstd = 1.0 / jt.sqrt(self.running_var + scalar(self.eps, self.running_var))
        return batchnorm_affine(x, self.weight, self.bias, self.running_mean, invstd)

    @staticmethod
    def _moments(x: jt.Var):
        """x [N, C, H, W] (detached) -> (mean, biased variance) float64 [C], two passes in
        double like torch's CPU kernel (on CPU: ``batchnorm_kernels``, the same sums)."""
        if batchnorm_kernels.use_kernels():
            return batchnorm_kernels.moments(x)
        xd = x.float64()
        mu = mean(xd, [0, 2, 3])
        return mu, mean((xd - mu.reshape(1, -1, 1, 1)) ** 2, [0, 2, 3])


class LayerNorm(nn.Module):
    """torch LayerNorm over the last dim.  Jittor's uses E[x^2] - E[x]^2 (8.8e-4 off for
    offset tokens): two-pass statistics in float64 here."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = jt.ones(normalized_shape)
        self.bias = jt.zeros(normalized_shape)

    def execute(self, x: jt.Var) -> jt.Var:
        xd = x.float64()
        mu = mean(xd, -1, keepdims=True)
        var = mean((xd - mu) ** 2, -1, keepdims=True)
        rstd = (1.0 / jt.sqrt(var + scalar(self.eps, var))).cast(x.dtype)
        return (x - mu.cast(x.dtype)) * rstd * self.weight + self.bias
