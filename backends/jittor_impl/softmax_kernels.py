"""CPU kernel for the attention softmax of ``attention.MultiheadAttention``.

Written with Jittor ops, a masked softmax over a [500, 500] decoder attention matrix is a
``where`` + max + exp/sum + divide forward and four more fused kernels backward (autodiff
of that formula keeps the exponentials, the sums and the mask): 63 ms of a 453 ms smoke
training step against torch's 4 ms (``parity bench --profile``).  Here one ``jt.Function``
does it row by row: forward y = exp(v - max v) / sum exp(v - max v), v = -inf where the
mask blocks (the ops path's expressions in the input's dtype, so a fully blocked row is NaN
as there), and torch's backward dx = y * (g - sum(g * y)), which needs only y.  OpenMP over
rows, one writer per row: any thread count gives the same bits.  The float32 exp is
``activation_kernels.EXP_HEADER``'s vectorised one (within 1 ulp of the correctly rounded
exp, like glibc's and torch's); float64 keeps libm's.

``RTDETR_JITTOR_SOFTMAX=ops`` selects the Jittor-ops path (the reference the kernel is
tested against); CUDA always uses it.  Shapes: x, mask, y, g [R, S] (rows R, softmax over S).
"""
from __future__ import annotations

import os

import jittor as jt          # prepared by framework: the package imports it first

from .activation_kernels import EXP_HEADER

SOFTMAX_IMPL = os.environ.get("RTDETR_JITTOR_SOFTMAX", "kernel")
if SOFTMAX_IMPL not in ("kernel", "ops"):
    raise ValueError(f"RTDETR_JITTOR_SOFTMAX must be 'kernel' or 'ops', got {SOFTMAX_IMPL!r}")

_FLAGS = {"FLAGS: -ffp-contract=off ": 1}
_HEADER = EXP_HEADER + "#include <limits>\n"

# in0 x [R, S] (T), in1 mask [R, S] (bool, True = blocked) -> out0 y [R, S]
_FORWARD = r"""
// op family: softmax
typedef in0_type T;
const long R = in0_shape0, S = in0_shape1;
const T NEG_INF = -std::numeric_limits<T>::infinity();
#pragma omp parallel for schedule(static)
for (long r = 0; r < R; r++) {
    const T* x = in0_p + r * S;
    const bool* blocked = in1_p + r * S;
    T* y = out0_p + r * S;
    T m = NEG_INF;
    for (long s = 0; s < S; s++) {
        const T v = blocked[s] ? NEG_INF : x[s];
        m = v > m ? v : m;
    }
    // the exponentials in a loop of their own (g++ vectorises it in float32; not with the
    // masked load of x in it), then the sum in index order
    for (long s = 0; s < S; s++) y[s] = (blocked[s] ? NEG_INF : x[s]) - m;
    for (long s = 0; s < S; s++) y[s] = exp_nonpos(y[s]);
    T sum = 0;
    for (long s = 0; s < S; s++) sum += y[s];
    for (long s = 0; s < S; s++) y[s] = y[s] / sum;
}
"""

# in0 y [R, S], in1 g [R, S] (T) -> out0 dx = y * (g - sum(g * y)), the row sum in double
_BACKWARD = r"""
// op family: softmax
typedef in0_type T;
const long R = in0_shape0, S = in0_shape1;
#pragma omp parallel for schedule(static)
for (long r = 0; r < R; r++) {
    const T* y = in0_p + r * S;
    const T* g = in1_p + r * S;
    T* dx = out0_p + r * S;
    double dot = 0;
    for (long s = 0; s < S; s++) dot += (double)g[s] * (double)y[s];
    const T d = (T)dot;
    for (long s = 0; s < S; s++) dx[s] = y[s] * (g[s] - d);
}
"""


def use_kernel() -> bool:
    """The CPU kernel is in use (looked up at call time, so tests may flip ``SOFTMAX_IMPL``)."""
    return SOFTMAX_IMPL == "kernel" and not jt.flags.use_cuda


class MaskedSoftmax(jt.Function):
    """softmax over the last dim of x [R, S] with the bool ``mask`` [R, S] (True = blocked)."""

    def execute(self, x, mask):
        y = jt.code(x.shape, x.dtype, [x, mask], cpu_header=_HEADER, cpu_src=_FORWARD)
        y.compile_options = _FLAGS
        self.y = y.detach()
        return y

    def grad(self, g):
        dx = jt.code(self.y.shape, self.y.dtype, [self.y, g.cast(self.y.dtype)],
                     cpu_header=_HEADER, cpu_src=_BACKWARD)
        dx.compile_options = _FLAGS
        return dx, None


def masked_softmax(x: jt.Var, mask=None) -> jt.Var:
    """x [..., S] -> softmax over S; ``mask`` bool, broadcastable to x (True = blocked)."""
    shape = x.shape
    if mask is None:
        mask = jt.zeros(shape, dtype=jt.bool)
    mask = mask.broadcast(shape) if tuple(mask.shape) != tuple(shape) else mask
    s = shape[-1]
    return MaskedSoftmax()(x.reshape(-1, s), mask.reshape(-1, s).stop_grad()).reshape(shape)
