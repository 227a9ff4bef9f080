"""Multi-scale deformable attention (official rtdetr_decoder.py / utils.py).

Two implementations of the sampling core, chosen by ONE switch, the environment variable
``RTDETR_JITTOR_MSDA`` read at import (``MSDA_IMPL``):
  * ``fused`` (default): on CPU, one ``jt.Function`` whose forward and backward are C++
    kernels (``jt.code``) doing every level's bilinear sampling and the weighted sum in
    one pass, and value / sampling-location / attention-weight gradients in one backward.
  * ``pure``: per-level ``grid_sample`` + stack + weighted sum in Jittor ops (the
    official code's formulation; reference of tests/test_jittor_msda_kernel.py).
On CUDA the pure path always runs: no CUDA kernel is written (none could be run here).
"""
from __future__ import annotations

import os

import numpy as np
from jittor import nn

from . import framework as fw
from .framework import jt

MSDA_IMPL = os.environ.get("RTDETR_JITTOR_MSDA", "fused")
if MSDA_IMPL not in ("fused", "pure"):
    raise ValueError(f"RTDETR_JITTOR_MSDA must be 'fused' or 'pure', got {MSDA_IMPL!r}")

# The kernels follow torch's CPU grid_sample (aten GridSamplerKernel.cpp, AVX2 build)
# operation for operation: float32 and float64 results are bit-equal to torch's on this
# machine (tests/test_jittor_msda_kernel.py):
#   x = fma(g + 1, W / 2, -0.5) with g = 2 loc - 1; corners nw, ne, sw, se with weights
#   s*e, s*w, n*e, n*w; sample = fma(se_v, se, fma(sw_v, sw, fma(ne_v, ne, nw_v * nw)));
#   output = sum over the n = levels x points terms sample * weight like torch's inner
#   sum: V = one vector (8 float32 / 4 float64) of lane accumulators over the first
#   floor(n / V) * V terms, then tail terms summed from 0, then + lane 0 ... V-1
#   (bit-equal for n <= 4 V: 32 float32 / 16 float64 terms; RT-DETR has 12);
#   d value: gOut * corner weight added corner by corner over chunks of one AVX2 vector
#   of sample points (32 bytes: 8 float32 / 4 float64), torch's scatter order;
#   d grid x: gx = fma(fma(se - sw, n, (ne - nw) * s), gOut, gx) over channels, * W / 2;
#   d weight: sum over channels of dout * sample as torch reduces [B*M, C, Lq*L*P] over C:
#   columns in whole chunks of 4 vectors (32 float32 / 16 float64) by torch_col_sum, the
#   last columns by torch_row_sum (bit-equal for C < 256).
# Every other product/sum must stay unfused: the kernels are built with -ffp-contract=off
# (without it g++ fuses a*b + c: output 88%, d value 85% bit-equal in float32).
_HEADER = r"""
#include <cmath>
#include <algorithm>
#include <vector>
// torch's sum of n < 256 strided terms down a column (multi_row_sum: blocks of 16, each
// summed from 0, added up; the rest summed from 0, then + the blocks)
template <typename T> static inline T torch_col_sum(const T* x, int n, int stride) {
    T blocks = 0, rest = 0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        T blk = 0;
        for (int j = 0; j < 16; j++) blk += x[(i + j) * stride];
        blocks += blk;
    }
    for (; i < n; i++) rest += x[i * stride];
    return rest + blocks;
}
// torch's scalar row_sum: four interleaved partial sums (rest into the first), in order
template <typename T> static inline T torch_row_sum(const T* x, int n) {
    const int m = n / 4;
    T a[4];
    for (int k = 0; k < 4; k++) a[k] = torch_col_sum(x + k, m, 4);
    for (int i = 4 * m; i < n; i++) a[0] += x[i];
    return ((a[0] + a[1]) + a[2]) + a[3];
}
template <typename T> struct MsdaSample {
    T n, s, w, e, wt[4];
    int off[4];                     // pixel index (row-major, within the level) per corner
    bool ok[4];                     // corner inside the map (zero padding otherwise)
    inline void setup(T lx, T ly, int h, int wd) {
        const T gx = lx * (T)2 - (T)1, gy = ly * (T)2 - (T)1;
        const T x = std::fma(gx + (T)1, (T)wd / (T)2, (T)-0.5);
        const T y = std::fma(gy + (T)1, (T)h / (T)2, (T)-0.5);
        const T xw = std::floor(x), yn = std::floor(y);
        w = x - xw; e = (T)1 - w; n = y - yn; s = (T)1 - n;
        wt[0] = s * e; wt[1] = s * w; wt[2] = n * e; wt[3] = n * w;
        const int ix = (int)xw, iy = (int)yn;
        for (int k = 0; k < 4; k++) {
            const int cx = ix + (k & 1), cy = iy + (k >> 1);
            ok[k] = cx > -1 && cx < wd && cy > -1 && cy < h;
            off[k] = cy * wd + cx;
        }
    }
    // channel rows of the 4 corners (zero row outside): v = &value[b, start, m, 0], row stride ld
    inline void rows(const T* v, long ld, const T* zero, const T** r) const {
        for (int k = 0; k < 4; k++) r[k] = ok[k] ? v + off[k] * ld : zero;
    }
    inline T interp(const T* const* r, int c) const {
        return std::fma(r[3][c], wt[3], std::fma(r[2][c], wt[2], std::fma(r[1][c], wt[1], r[0][c] * wt[0])));
    }
};
"""

# inputs: value [B, S, M, C], sampling_locations [B, Lq, M, L, P, 2],
# attention_weights [B, Lq, M, L, P], levels int32 [L, 3] (h, w, start); output [B, Lq, M, C].
# One thread per (b, m): it alone writes out[b, :, m, :], so no atomics and no races.
_FORWARD = r"""
typedef in0_type T;
const int B = in0_shape0, S = in0_shape1, M = in0_shape2, C = in0_shape3;
const int Lq = in1_shape1, L = in1_shape3, P = in1_shape4;
const int V = 32 / sizeof(T), n = L * P, nv = n / V;    // torch's inner sum, see above
#pragma omp parallel for schedule(static)
for (int bm = 0; bm < B * M; bm++) {
    const int b = bm / M, m = bm % M;
    std::vector<T> acc((size_t)V * C), tail(C), zero(C, (T)0);   // acc: [lane, channel]
    const T* r[4];
    for (int q = 0; q < Lq; q++) {
        std::fill(acc.begin(), acc.end(), (T)0);
        std::fill(tail.begin(), tail.end(), (T)0);
        for (int l = 0; l < L; l++) {
            const int h = in3_p[3 * l], wd = in3_p[3 * l + 1], start = in3_p[3 * l + 2];
            const T* v = in0_p + ((long)b * S + start) * M * C + (long)m * C;
            for (int p = 0; p < P; p++) {
                const long k = (((long)(b * Lq + q) * M + m) * L + l) * P + p;
                const int t = l * P + p;
                MsdaSample<T> sp;
                sp.setup(in1_p[2 * k], in1_p[2 * k + 1], h, wd);
                const T a = in2_p[k];
                sp.rows(v, (long)M * C, zero.data(), r);
                T* dst = t < nv * V ? acc.data() + (size_t)(t % V) * C : tail.data();
                for (int c = 0; c < C; c++) dst[c] += sp.interp(r, c) * a;
            }
        }
        T* o = out0_p + ((long)(b * Lq + q) * M + m) * C;
        for (int c = 0; c < C; c++) {
            T r = tail[c];
            for (int i = 0; i < V; i++) r += acc[(size_t)i * C + c];
            o[c] = r;
        }
    }
}
"""

# inputs as forward + in4 = d output [B, Lq, M, C];
# outputs d value [B, S, M, C], d sampling_locations, d attention_weights (input shapes).
_BACKWARD = r"""
typedef in0_type T;
const int B = in0_shape0, S = in0_shape1, M = in0_shape2, C = in0_shape3;
const int Lq = in1_shape1, L = in1_shape3, P = in1_shape4;
const int K = 32 / sizeof(T);       // torch's AVX2 vector of sample points
const long ld = (long)M * C;
#pragma omp parallel for schedule(static)
for (int bm = 0; bm < B * M; bm++) {
    const int b = bm / M, m = bm % M;
    for (int t = 0; t < S; t++)
        std::fill(out0_p + ((long)b * S + t) * ld + (long)m * C, out0_p + ((long)b * S + t) * ld + (long)m * C + C, (T)0);
    MsdaSample<T> sp[8];
    long kk[8], dd[8];
    T a[8], gx[8], gy[8];
    const T* r[4];
    // per point and channel: gOut = dout * weight, and dout * sample
    std::vector<T> go((size_t)K * C), prod((size_t)K * C), zero(C, (T)0);
    const int ncol = Lq * L * P, vcol = ncol / (4 * K) * (4 * K);
    for (int l = 0; l < L; l++) {
        const int h = in3_p[3 * l], wd = in3_p[3 * l + 1], start = in3_p[3 * l + 2];
        const T* v = in0_p + ((long)b * S + start) * ld + (long)m * C;
        T* dv = out0_p + ((long)b * S + start) * ld + (long)m * C;
        for (int k0 = 0; k0 < Lq * P; k0 += K) {
            const int nk = std::min(K, Lq * P - k0);
            for (int j = 0; j < nk; j++) {
                const int q = (k0 + j) / P, p = (k0 + j) % P;
                kk[j] = (((long)(b * Lq + q) * M + m) * L + l) * P + p;
                dd[j] = ((long)(b * Lq + q) * M + m) * C;
                sp[j].setup(in1_p[2 * kk[j]], in1_p[2 * kk[j] + 1], h, wd);
                a[j] = in2_p[kk[j]];
                gx[j] = 0; gy[j] = 0;
            }
            for (int j = 0; j < nk; j++)
                for (int c = 0; c < C; c++) go[(size_t)j * C + c] = in4_p[dd[j] + c] * a[j];
            // per d value element the adds come in torch's order: corner-major, then point
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < nk; j++)
                    if (sp[j].ok[k]) {
                        T* d = dv + sp[j].off[k] * ld;
                        const T* g = go.data() + (size_t)j * C;
                        for (int c = 0; c < C; c++) d[c] += g[c] * sp[j].wt[k];
                    }
            for (int j = 0; j < nk; j++) {
                sp[j].rows(v, ld, zero.data(), r);
                const T* g = go.data() + (size_t)j * C;
                for (int c = 0; c < C; c++) {
                    gx[j] = std::fma(std::fma(r[3][c] - r[2][c], sp[j].n, (r[1][c] - r[0][c]) * sp[j].s), g[c], gx[j]);
                    gy[j] = std::fma(std::fma(r[3][c] - r[1][c], sp[j].w, (r[2][c] - r[0][c]) * sp[j].e), g[c], gy[j]);
                    prod[(size_t)j * C + c] = in4_p[dd[j] + c] * sp[j].interp(r, c);
                }
            }
            for (int j = 0; j < nk; j++) {
                out1_p[2 * kk[j]] = gx[j] * ((T)wd / (T)2) * (T)2;      // d grid * 2 = d location
                out1_p[2 * kk[j] + 1] = gy[j] * ((T)h / (T)2) * (T)2;
                const int col = (k0 + j) / P * L * P + l * P + (k0 + j) % P;
                const T* pr = prod.data() + (size_t)j * C;
                out2_p[kk[j]] = col < vcol ? torch_col_sum(pr, C, 1) : torch_row_sum(pr, C);
            }
        }
    }
}
"""
_FLAGS = {"FLAGS: -ffp-contract=off ": 1}


class MSDeformableAttnFunction(jt.Function):
    """Fused multi-scale deformable sampling (CPU).  execute(value [B, S, M, C], levels int32
    [L, 3] (h, w, start), sampling_locations [B, Lq, M, L, P, 2], attention_weights
    [B, Lq, M, L, P]) -> [B, Lq, M, C]; grad gives value, location and weight gradients
    from one kernel.  Results do not depend on the thread count (one thread per (b, m))."""

    def execute(self, value, levels, sampling_locations, attention_weights):
        self.saved = [x.detach() for x in (value, sampling_locations, attention_weights)] + [levels]
        value, loc, aw = self.saved[:3]
        bs, len_q, n_head, _, _, _ = loc.shape
        out = jt.code([bs, len_q, n_head, value.shape[3]], value.dtype, [value, loc, aw, levels],
                      cpu_header=_HEADER, cpu_src=_FORWARD)
        out.compile_options = _FLAGS
        return out

    def grad(self, grad_output):
        value, loc, aw, levels = self.saved
        dvalue, dloc, daw = jt.code([value.shape, loc.shape, aw.shape], [value.dtype] * 3,
                                    [value, loc, aw, levels, grad_output.cast(value.dtype)],
                                    cpu_header=_HEADER, cpu_src=_BACKWARD)
        dvalue.compile_options = _FLAGS
        return dvalue, None, dloc, daw


def ms_deform_attn_fused(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Same contract as ``deformable_attention_core_func`` (value [B, S, M, c] ->
    [B, Lq, M * c]), through ``MSDeformableAttnFunction``."""
    bs, _, n_head, c = value.shape
    starts = np.cumsum([0] + [h * w for h, w in value_spatial_shapes])[:-1]
    levels = fw.constant(np.array([[h, w, s] for (h, w), s in zip(value_spatial_shapes, starts)], np.int32))
    out = MSDeformableAttnFunction()(value, levels, sampling_locations, attention_weights)
    return out.reshape(bs, sampling_locations.shape[1], n_head * c)


def ms_deformable_attn_core(value, value_spatial_shapes, sampling_locations, attention_weights):
    """The core ``MSDA_IMPL`` selects: the fused CPU op, or the pure-op function (always
    on CUDA).  Looked up at call time, so tests may flip ``MSDA_IMPL``."""
    if MSDA_IMPL == "fused" and not jt.flags.use_cuda:
        return ms_deform_attn_fused(value, value_spatial_shapes, sampling_locations, attention_weights)
    return deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights)


def deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Bilinear sampling of every level at the sampling locations, weighted sum.

    value               [B, S, n_head, c]             S = sum of h*w over levels
    value_spatial_shapes [(h, w)] per level
    sampling_locations  [B, Lq, n_head, n_levels, n_points, 2]   (x, y) in [0, 1]
    attention_weights   [B, Lq, n_head, n_levels, n_points]
    returns             [B, Lq, n_head * c]
    """
    bs, _, n_head, c = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    sampling_grids = 2 * sampling_locations - 1          # grid_sample's [-1, 1] convention
    sampling_value_list = []
    start = 0
    for level, (h, w) in enumerate(value_spatial_shapes):
        # [B, hw, M, c] -> [B, M*c, hw] -> [B*M, c, h, w]
        value_l = value[:, start:start + h * w].reshape(bs, h * w, n_head * c).permute(0, 2, 1)
        value_l = value_l.reshape(bs * n_head, c, h, w)
        start += h * w
        # [B, Lq, M, P, 2] -> [B, M, Lq, P, 2] -> [B*M, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(bs * n_head, len_q, n_points, 2)
        sampling_value_list.append(fw.grid_sample(value_l, grid_l))          # [B*M, c, Lq, P]
    # [B, Lq, M, L, P] -> [B, M, Lq, L, P] -> [B*M, 1, Lq, L*P]
    attention_weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_head, 1, len_q, n_levels * n_points)
    stacked = jt.stack(sampling_value_list, dim=-2).reshape(bs * n_head, c, len_q, n_levels * n_points)
    output = (stacked * attention_weights).sum(-1).reshape(bs, n_head * c, len_q)
    return output.permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points=4):
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.total_points = num_heads * num_levels * num_points
        self.head_dim = embed_dim // num_heads
        assert self.head_dim * num_heads == embed_dim, "embed_dim must be divisible by num_heads"
        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.ms_deformable_attn_core = ms_deformable_attn_core

    def execute(self, query, reference_points, value, value_spatial_shapes, value_mask=None):
        """query [B, Lq, C]; reference_points [B, Lq, n_levels or 1, 2 or 4] in [0, 1];
        value [B, S, C]; value_mask [B, S] (True = keep) -> [B, Lq, C]."""
        bs, len_q = query.shape[:2]
        len_v = value.shape[1]
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.cast(value.dtype).unsqueeze(-1)
        value = value.reshape(bs, len_v, self.num_heads, self.head_dim)
        sampling_offsets = self.sampling_offsets(query).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points, 2)
        attention_weights = self.attention_weights(query).reshape(
            bs, len_q, self.num_heads, self.num_levels * self.num_points)
        attention_weights = fw.softmax(attention_weights, dim=-1).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (w, h)
            normalizer = fw.constant([[w, h] for h, w in value_spatial_shapes], str(query.dtype))
            sampling_locations = (reference_points.reshape(bs, len_q, 1, self.num_levels, 1, 2)
                                  + sampling_offsets / normalizer.reshape(1, 1, 1, self.num_levels, 1, 2))
        elif reference_points.shape[-1] == 4:
            # offsets scaled by half the reference box size, over num_points
            ref = reference_points.unsqueeze(2).unsqueeze(4)          # [B, Lq, 1, L', 1, 4]
            sampling_locations = ref[..., :2] + sampling_offsets / self.num_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
        output = self.ms_deformable_attn_core(value, value_spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)
