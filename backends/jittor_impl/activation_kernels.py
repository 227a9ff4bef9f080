"""CPU kernels for the forward of ``framework._Sigmoid`` (SiLU in the encoder, box heads),
and the vectorisable exp they and ``softmax_kernels`` share (``EXP_HEADER``).

The stable sigmoid y = 1 / (1 + e) for x >= 0, e / (1 + e) otherwise, e = exp(-|x|), is one
fused Jittor kernel, but Jittor's generated kernels run on one core and call glibc's scalar
``expf`` (g++ vectorises no libm call without fast-math): the largest elementwise kernel
of an r18vd step at 640 (52 calls, 69 ms, ``parity bench --profile``).  Here the same
expression is a ``jt.code`` loop shared by the OpenMP threads (every value written by one
thread: any thread count gives the same bits), and in float32 its exp is ``exp_nonpos``:
Cody-Waite reduction by ln 2 (two-part constant), a degree-7 polynomial on |r| <= ln2 / 2
in Horner form with fused multiply-adds, and 2^n applied in two halves (subnormal results
round once).  Measured over every non-positive float32 (step 7, 306 M values): 99.76 %
correctly rounded, the rest 1 unit in the last place (glibc's expf: 99.995 %, torch's
vectorised Sleef exp: also within 1 ulp); exp(-inf) = 0, NaN stays NaN.  g++ vectorises it
(AVX-512 on this host): a [1, 256, 80, 80] sigmoid 5.7 -> 0.75 ms in plain C++.  float64
keeps ``std::exp`` and the ops path's bits.

``RTDETR_JITTOR_ACT=ops`` selects the Jittor-ops path (the reference,
tests/test_jittor_activation_kernels.py); CUDA always uses it.
Shapes: x, y [any] (computed flat).
"""
from __future__ import annotations

import os

import jittor as jt          # prepared by framework: the package imports it first

ACT_IMPL = os.environ.get("RTDETR_JITTOR_ACT", "kernel")
if ACT_IMPL not in ("kernel", "ops"):
    raise ValueError(f"RTDETR_JITTOR_ACT must be 'kernel' or 'ops', got {ACT_IMPL!r}")

_FLAGS = {"FLAGS: -ffp-contract=off ": 1}

# exp(x) for x <= 0 (and -inf, NaN); the float overload vectorises, the double one is libm's.
EXP_HEADER = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
static inline float pow2_int(int k) {              // 2^k for -126 <= k <= 127
    const uint32_t bits = (uint32_t)(k + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static inline float exp_nonpos(float x) {
    x = x < -104.0f ? -104.0f : x;                 // exp(-104) rounds to 0 in float32
    const float shift = 12582912.0f;               // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504088896341f + shift) - shift;
    float r = std::fma(n, -0.693145751953125f, x);             // ln 2, high part (exact n * hi)
    r = std::fma(n, -1.42860682030941723212e-6f, r);          // ln 2, low part
    float p = 1.0f / 5040;
    p = std::fma(p, r, 1.0f / 720);
    p = std::fma(p, r, 1.0f / 120);
    p = std::fma(p, r, 1.0f / 24);
    p = std::fma(p, r, 1.0f / 6);
    p = std::fma(p, r, 0.5f);
    p = std::fma(p, r, 1.0f);
    p = std::fma(p, r, 1.0f);
    const int k = (int)n, k1 = k / 2;              // n in [-150, 0]: two normal powers of 2
    return p * pow2_int(k1) * pow2_int(k - k1);
}
static inline double exp_nonpos(double x) { return std::exp(x); }
"""

# in0 x [n] (T) -> out0 y [n]
_SIGMOID = r"""
// op family: elementwise
typedef in0_type T;
const long n = in0->num;
#pragma omp parallel for schedule(static)
for (long i = 0; i < n; i++) {
    const T x = in0_p[i];
    const T e = exp_nonpos(-std::abs(x));
    out0_p[i] = x >= 0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
}
"""


def use_kernel() -> bool:
    """The CPU kernel is in use (looked up at call time, so tests may flip ``ACT_IMPL``)."""
    return ACT_IMPL == "kernel" and not jt.flags.use_cuda


def sigmoid(x: jt.Var) -> jt.Var:
    """The stable sigmoid of x (detached; the caller's ``jt.Function`` owns the gradient)."""
    y = jt.code((x.numel(),), x.dtype, [x.detach().reshape(-1)], cpu_header=EXP_HEADER, cpu_src=_SIGMOID)
    y.compile_options = _FLAGS
    return y.reshape(x.shape)
