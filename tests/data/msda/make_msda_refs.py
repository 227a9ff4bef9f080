"""Record the PyTorch values the fused Jittor deformable-attention kernel is tested against.

Run in the torch environment from the repository root (never imported by the Jittor backend):
    .venvs/torch/bin/python tests/data/msda/make_msda_refs.py
Writes ``msda_refs.npz`` next to this file: for float32 and float64, the seeded inputs
(value [B, S, M, C], sampling_locations [B, Lq, M, L, P, 2], attention_weights
[B, Lq, M, L, P], output gradient [B, Lq, M*C]) and the torch backend's
``deformable_attention_core_func`` output with its value / location / weight gradients.
tests/test_jittor_msda_kernel.py reads it.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

OUT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(OUT))))
from backends.torch_impl.deformable_attention import deformable_attention_core_func  # noqa: E402

torch.set_num_threads(1)
# non-square levels; the first two have power-of-two sides so that the border locations
# below are exact binary numbers (pixel coordinate x = loc * w - 0.5 exactly)
SHAPES = [(4, 8), (2, 4), (3, 5), (1, 1)]
B, LQ, M, C, P = 2, 9, 3, 16, 3          # C 16: the smoke head dim


def inputs():
    """float64 inputs; float32 cases use the same values rounded."""
    rng = np.random.default_rng(19)
    s = sum(h * w for h, w in SHAPES)
    value = rng.normal(0, 1, (B, s, M, C))
    loc = rng.uniform(-0.3, 1.3, (B, LQ, M, len(SHAPES), P, 2))          # some outside the map
    # pixel coordinates on centres (integers: one corner weight exactly 0), on the map
    # edges (-0.5, w - 0.5), just outside (-1, w) and far outside
    for lvl in (0, 1):
        h, w = SHAPES[lvl]
        xs = np.array([-1.0, -0.5, 0.0, 1.0, w - 1.0, w - 0.5, w, 2.5, -3.0])
        ys = np.array([0.0, h - 1.0, -0.5, h - 0.5, -1.0, h, 1.0, 0.5, h + 2.0])
        for q in range(LQ):
            loc[0, q, q % M, lvl, q % P] = [(xs[q] + 0.5) / w, (ys[q] + 0.5) / h]
            loc[1, q, (q + 1) % M, lvl, (q + 1) % P] = [(xs[-1 - q] + 0.5) / w, (ys[q] + 0.5) / h]
    logits = rng.normal(0, 1, (B, LQ, M, len(SHAPES) * P))
    aw = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(B, LQ, M, len(SHAPES), P)
    grad = rng.normal(0, 1, (B, LQ, M * C))
    return value, loc, aw, grad


def main():
    arrays = {"shapes": np.array(SHAPES, dtype=np.int64)}
    for dtype in ("float32", "float64"):
        value, loc, aw, grad = (a.astype(dtype) for a in inputs())
        vt, lt, at = (torch.from_numpy(a).requires_grad_(True) for a in (value, loc, aw))
        out = deformable_attention_core_func(vt, SHAPES, lt, at)
        out.backward(torch.from_numpy(grad))
        for k, a in (("value", value), ("loc", loc), ("aw", aw), ("grad", grad), ("out", out),
                     ("dvalue", vt.grad), ("dloc", lt.grad), ("daw", at.grad)):
            arrays[f"{dtype}_{k}"] = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    np.savez_compressed(os.path.join(OUT, "msda_refs.npz"), **arrays)
    print("msda_refs.npz:", ", ".join(sorted(arrays)))


if __name__ == "__main__":
    main()
