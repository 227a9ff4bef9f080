"""CPU kernels for the train-mode reductions of ``normalization.BatchNorm2d``.

torch's CPU BatchNorm accumulates its channel sums in double (``at::acc_type<float, false>``),
two passes for the variance, and its backward is the analytic one.  Written with Jittor
ops, that is a float64 cast + reduce over [N, H, W] per statistic: 4 reductions per layer
and step, and Jittor's reduce loops were 200 ms of an r18vd training step at 640 (torch's
whole BatchNorm, 68 ms).  On CPU the statistics and the backward therefore run as
``jt.code`` kernels (``_MOMENTS``, ``_BACKWARD``): one thread per channel (OpenMP), each
channel summed in double in torch's order, no atomics, so any thread count gives the same
bits.  The elementwise arithmetic is the ops path's, operation for operation, in x's dtype
(built with -ffp-contract=off, so no fused multiply-add changes a rounding).

``RTDETR_JITTOR_BN=ops`` selects the Jittor-ops path everywhere (the reference the kernels
are tested against); CUDA always uses it.  Shapes: x, g [N, C, H, W]; per-channel [C].
"""
from __future__ import annotations

import os

import jittor as jt          # prepared by framework: the package imports it first

BN_IMPL = os.environ.get("RTDETR_JITTOR_BN", "kernel")
if BN_IMPL not in ("kernel", "ops"):
    raise ValueError(f"RTDETR_JITTOR_BN must be 'kernel' or 'ops', got {BN_IMPL!r}")

_FLAGS = {"FLAGS: -ffp-contract=off ": 1}

# Sum of one channel's N planes of HW values in double, one accumulator in index order:
# torch's CPU loop (batch_norm_cpu_collect_stats_contiguous_impl) sums exactly so, and
# float64 parity depends on it (4 interleaved accumulators put smoke's float64
# intermediates at 2.1e-13 from torch instead of 3.3e-14).  EXPR(j) is the term of element j.
_HEADER = r"""
#define CHANNEL_SUM(RESULT, EXPR)                                               \
    {                                                                           \
        double s_ = 0;                                                          \
        for (int n = 0; n < N; n++) {                                           \
            const long base_ = ((long)n * C + c) * HW;                          \
            for (long j = base_; j < base_ + HW; j++) s_ += (EXPR);             \
        }                                                                       \
        RESULT = s_;                                                            \
    }
"""

# Both kernels: in0 is [N, C, H, W] of dtype T; one OpenMP thread per channel c (the loop
# body follows, closed by the kernel).  The first line names the profiler family
# (parity/workers/op_families.py).
_CHANNELS = r"""
// op family: normalisation
typedef in0_type T;
const int N = in0_shape0, C = in0_shape1;
const long HW = (long)in0_shape2 * in0_shape3;
const double count = (double)N * (double)HW;
#pragma omp parallel for schedule(static)
for (int c = 0; c < C; c++) {"""

# in: x [N, C, H, W] (T) -> out0 mean [C], out1 biased variance [C] (double, two passes)
_MOMENTS = _CHANNELS + r"""
    double total, squares;
    CHANNEL_SUM(total, (double)in0_p[j]);
    const double mu = total / count;
    CHANNEL_SUM(squares, ((double)in0_p[j] - mu) * ((double)in0_p[j] - mu));
    out0_p[c] = mu;
    out1_p[c] = squares / count;
}
"""

# in: g, x [N, C, H, W], mu, invstd, weight [C] (all T)
# out0 dx [N, C, H, W] (T), out1 sum(g) [C], out2 sum(g * xhat) [C] (double)
# xhat = (x - mu) * invstd and dx = ((g - a) - xhat * b) * (weight * invstd) in T, with
# a = T(sum(g) / n), b = T(sum(g * xhat) / n): the ops path's arithmetic.
_BACKWARD = _CHANNELS + r"""
    const T mu = in2_p[c], rs = in3_p[c], ws = in4_p[c] * in3_p[c];
    // Both sums in one pass over g and x: each keeps its own accumulator in index order,
    // so the bits are those of two separate passes, for one read of g and x fewer.
    double sg = 0, sgx = 0;
    for (int n = 0; n < N; n++) {
        const long base = ((long)n * C + c) * HW;
        for (long j = base; j < base + HW; j++) {
            sg += (double)in0_p[j];
            sgx += (double)in0_p[j] * (double)((in1_p[j] - mu) * rs);
        }
    }
    const T a = (T)(sg / count), b = (T)(sgx / count);
    for (int n = 0; n < N; n++) {
        const long base = ((long)n * C + c) * HW;
        for (long i = 0; i < HW; i++) {
            const long j = base + i;
            const T xhat = (in1_p[j] - mu) * rs;
            out0_p[j] = ((in0_p[j] - a) - xhat * b) * ws;
        }
    }
    out1_p[c] = sg;
    out2_p[c] = sgx;
}
"""


def use_kernels() -> bool:
    """The CPU kernels are in use (looked up at call time, so tests may flip ``BN_IMPL``)."""
    return BN_IMPL == "kernel" and not jt.flags.use_cuda


def moments(x: jt.Var):
    """x [N, C, H, W] (detached) -> (mean, biased variance), float64 [C]: two passes in double."""
    mu, var = jt.code([(x.shape[1],), (x.shape[1],)], [jt.float64, jt.float64], [x],
                      cpu_header=_HEADER, cpu_src=_MOMENTS)
    mu.compile_options = _FLAGS
    return mu, var


def backward(g: jt.Var, x: jt.Var, mu: jt.Var, invstd: jt.Var, weight: jt.Var):
    """Train-mode BatchNorm backward: g, x [N, C, H, W]; mu, invstd, weight [C] (x's dtype)
    -> (dx [N, C, H, W] in x's dtype, sum(g) [C], sum(g * xhat) [C] in float64)."""
    dx, sum_g, sum_gx = jt.code([x.shape, mu.shape, mu.shape], [x.dtype, jt.float64, jt.float64],
                                [g.cast(x.dtype), x, mu, invstd, weight.cast(x.dtype)],
                                cpu_header=_HEADER, cpu_src=_BACKWARD)
    dx.compile_options = _FLAGS
    return dx, sum_g, sum_gx
