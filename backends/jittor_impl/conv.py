"""``Conv2d``: torch's nn.Conv2d, with the convolutions that oneDNN's GEMM does faster
routed onto it (float32 on CPU).

Jittor lowers every float32 CPU convolution to ``mkl_conv`` (its bundled oneDNN 2.2), which
reorders the input, the weights and the output between NCHW and a blocked layout on every
call, forward and both backward passes.  For a 1x1 convolution that bookkeeping costs more
than the product itself.  Measured, one thread, forward + both gradients
(backends/jittor_pitfalls.md section 20): [1,512,20,20] -> 2048 channels 55.7 -> 15.7 ms
(torch 17.8), [1,256,160,160] -> 64 channels 45.9 -> 22.4 ms (torch 32.4); the 3-channel
stem (3x3, stride 2, 640x640) 29.7 -> 16.0 ms (torch 17.4).  A 3x3 convolution over many
channels stays on ``mkl_conv``: its im2col copy is larger than the reorders (64 channels
at 160x160: 50 -> 89 ms).

So, in float32 on CPU:
  * 1x1, stride 1, no padding: y[n] = W [O, C] @ x[n] [C, H*W], one 2-D GEMM;
  * C * kh * kw <= ``IM2COL_MAX_ROWS`` (the stem), 1x1 with stride or padding (the im2col
    copy is then no larger than x), or out channels >= output pixels (small maps: the
    weight reorders outweigh the im2col copy; 512 -> 512 channels at 10x10 21.4 -> 11.2 ms,
    at 3x5 10.9 -> 2.7 ms, torch 21.4 / 8.6): im2col by ``reindex`` (zeros outside the
    map, i.e. zero padding), then one 2-D GEMM;
  * anything else, float64 (no CPU GEMM in Jittor: the reduction either way) and CUDA
    (cuDNN): Jittor's own ``nn.conv2d``.
Both routes compute the same sum as ``nn.conv2d`` in another order (float32 rounding,
~1e-7 relative); their gradients are the matmuls' own, which Jittor also lowers to GEMMs.
``RTDETR_JITTOR_CONV=mkl`` turns the routes off (the reference they are tested against).
"""
from __future__ import annotations

import os

from jittor import nn

from .framework import jt

CONV_IMPL = os.environ.get("RTDETR_JITTOR_CONV", "gemm")
if CONV_IMPL not in ("gemm", "mkl"):
    raise ValueError(f"RTDETR_JITTOR_CONV must be 'gemm' or 'mkl', got {CONV_IMPL!r}")

IM2COL_MAX_ROWS = 32     # C*kh*kw of the stem (3*3*3 = 27); 3x3 over 64 channels is 576


def _route(conv: nn.Conv2d, x: jt.Var) -> str:
    """'1x1' | 'im2col' | 'mkl' for this call (see the module docstring)."""
    if CONV_IMPL != "gemm" or x.dtype != jt.float32 or jt.flags.use_cuda:
        return "mkl"
    if conv.groups != 1 or conv.dilation != (1, 1):
        return "mkl"
    kh, kw = conv.kernel_size
    if (kh, kw) == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        return "1x1"
    if kh * kw == 1 or conv.in_channels * kh * kw <= IM2COL_MAX_ROWS:
        return "im2col"
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    oh, ow = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    if conv.out_channels >= oh * ow:                # the weights outweigh the im2col copy
        return "im2col"
    return "mkl"


def _columns(x: jt.Var, conv: nn.Conv2d, oh: int, ow: int) -> jt.Var:
    """x [N, C, H, W] -> im2col [C*kh*kw, N*oh*ow]; taps outside the map read 0."""
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    cols = x.reindex([c, kh, kw, n, oh, ow],
                     ["i3", "i0", f"i4*{sh}-{ph}+i1", f"i5*{sw}-{pw}+i2"])
    return cols.reshape(c * kh * kw, n * oh * ow)


def conv2d_gemm(conv: nn.Conv2d, x: jt.Var, route: str) -> jt.Var:
    """x [N, C, H, W] -> [N, O, oh, ow] as one 2-D GEMM (route '1x1' or 'im2col')."""
    n, c, h, w = x.shape
    o = conv.out_channels
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if route == "1x1":
        # [C, N*H*W]: a free reshape at batch 1, one transpose otherwise
        cols = x.reshape(c, h * w) if n == 1 else x.permute(1, 0, 2, 3).reshape(c, n * h * w)
    else:
        cols = _columns(x, conv, oh, ow)
    y = jt.matmul(conv.weight.reshape(o, c * kh * kw), cols)               # [O, N*oh*ow]
    y = y.reshape(1, o, oh, ow) if n == 1 else y.reshape(o, n, oh, ow).permute(1, 0, 2, 3)
    if conv.bias is not None:
        y = y + conv.bias.reshape(1, o, 1, 1)
    return y


class Conv2d(nn.Conv2d):
    """torch nn.Conv2d (keys weight [O, C/groups, kh, kw], bias [O]); see the module
    docstring for which calls run as a GEMM."""

    def execute(self, x: jt.Var) -> jt.Var:
        route = _route(self, x)
        return super().execute(x) if route == "mkl" else conv2d_gemm(self, x, route)
