"""MultiheadAttention: torch's nn.MultiheadAttention (batch_first, need_weights=False) with
every CPU float32 matmul on a 2-D GEMM and the masked softmax as one kernel
(``softmax_kernels``, ``RTDETR_JITTOR_SOFTMAX``).  Mirrors ``backends/torch_impl/attention.py``.
"""
from __future__ import annotations

import numpy as np
from jittor import nn

from . import softmax_kernels
from .framework import full_like, jt, scalar, softmax


class MultiheadAttention(nn.Module):
    """torch nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=True) with
    need_weights=False (jittor.nn has none; jittor.attention's skips dropout when weights
    are returned).  Keys in_proj_weight [3E, E], in_proj_bias [3E], out_proj.{weight,bias}.
    attn_mask: bool [L, S] (True = blocked) or additive float.

    On CPU Jittor turns only 2-D float32 matmuls into a oneDNN GEMM; a 4-D ``jt.matmul``
    runs as broadcast-multiply-reduce (2.3x slower on the smoke decoder).  So float32 on
    CPU attends one (batch, head) at a time with 2-D matmuls; float64 (no CPU GEMM: the
    same reduction either way) and CUDA (batched matmul is cuBLAS) keep the 4-D form."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = True):
        assert batch_first, "only batch_first=True is used by RT-DETR"
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = jt.zeros((3 * embed_dim, embed_dim))
        self.in_proj_bias = jt.zeros((3 * embed_dim,))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = dropout

    def _probs(self, att, attn_mask):
        """scaled scores [..., L, S] -> attention probabilities (mask, softmax, dropout)."""
        if softmax_kernels.use_kernel():                  # mask, softmax and backward in one op
            bool_mask = attn_mask is not None and attn_mask.dtype == jt.bool
            if attn_mask is not None and not bool_mask:
                att = att + attn_mask
            att = softmax_kernels.masked_softmax(att, attn_mask if bool_mask else None)
        else:
            att = self._probs_ops(att, attn_mask)
        if self.dropout > 0 and self.is_training():       # jittor.nn.dropout defaults to eval
            att = nn.dropout(att, self.dropout, is_train=True)
        return att

    @staticmethod
    def _probs_ops(att, attn_mask):
        """The softmax of ``_probs`` in Jittor ops (CUDA; RTDETR_JITTOR_SOFTMAX=ops)."""
        if attn_mask is not None:
            if attn_mask.dtype == jt.bool:
                att = jt.where(attn_mask, full_like(att, float("-inf")), att)
            else:
                att = att + attn_mask
        return softmax(att, dim=-1)

    def _attend_batched(self, q, k, v, attn_mask):
        # q [B, L, E], k/v [B, S, E] -> [B, L, E] via [B, H, L, S] scores
        b, l, e = q.shape
        s, h, d = k.shape[1], self.num_heads, self.head_dim
        q = q.reshape(b, l, h, d).permute(0, 2, 1, 3)
        k = k.reshape(b, s, h, d).permute(0, 2, 1, 3)
        v = v.reshape(b, s, h, d).permute(0, 2, 1, 3)
        att = jt.matmul(q, k.permute(0, 1, 3, 2)) * scalar(1.0 / float(np.sqrt(d)), q)   # [B, H, L, S]
        return jt.matmul(self._probs(att, attn_mask), v).permute(0, 2, 1, 3).reshape(b, l, e)

    def _attend_2d(self, q, k, v, attn_mask):
        # same as _attend_batched, every matmul 2-D: [L, d] x [S, d]^T and [L, S] x [S, d]
        d, scale = self.head_dim, scalar(1.0 / float(np.sqrt(self.head_dim)), q)
        rows = []
        for i in range(q.shape[0]):
            qi, ki, vi = q[i], k[i], v[i]                                 # [L, E], [S, E]
            heads = []
            for j in range(self.num_heads):
                cols = slice(j * d, (j + 1) * d)
                att = nn.matmul_transpose(qi[:, cols], ki[:, cols]) * scale  # [L, S]
                heads.append(jt.matmul(self._probs(att, attn_mask), vi[:, cols]))
            rows.append(jt.concat(heads, dim=1))                          # [L, E]
        return jt.stack(rows)

    def execute(self, query, key, value, attn_mask=None, need_weights=False):
        # query [B, L, E], key/value [B, S, E] -> ([B, L, E], None)
        e = self.embed_dim
        w, bias = self.in_proj_weight, self.in_proj_bias
        q = nn.linear(query, w[:e], bias[:e])
        k = nn.linear(key, w[e:2 * e], bias[e:2 * e])
        v = nn.linear(value, w[2 * e:], bias[2 * e:])
        gemm_2d = q.dtype == jt.float32 and not jt.flags.use_cuda
        out = (self._attend_2d if gemm_2d else self._attend_batched)(q, k, v, attn_mask)
        return self.out_proj(out), None
