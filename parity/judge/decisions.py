"""Classifying a discrete decision on which two sides disagree: an order flip, a tie, or a
real difference.

RT-DETR makes two discrete choices per forward pass: the encoder's top-k query selection
(rank the ``S`` memory tokens by their best class logit, keep ``Q``) and, in the loss, one
Hungarian assignment per decoder output.  Two correct float32 programs can choose differently
when two candidates are within float32 rounding of each other.  A choice is judged by the
*exact* (float64 reference) values of what was compared, against float32's own noise on
those values (the base side's float32 vs its float64 run):

* ``same``   the choices are identical;
* ``order``  top-k only: the same set in another order (the decoder is equivariant to the
  order of its queries, tests/test_query_order.py, so this changes nothing but the order);
* ``tie``    a different choice, but every pair the two sides rank oppositely has an exact
  score gap within ``k`` x the float32 noise (top-k), or the candidate's assignment costs at
  most ``k`` x the cost noise more than the base's under the exact costs (matching);
* ``flip``   a gap beyond the noise: a real difference (a bug in the scores, the costs or
  the selection itself), reported as the first divergence.

In a float64 comparison the "noise" is ``rel64`` x the largest score (float64 rounding).
Everything is numpy; arrays come from the workers' result files (``note/...`` keys).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
KIND_ORDER = {"same": 0, "order": 1, "tie": 2, "flip": 3}      # the worse kind ranks higher


def _inversion_gap(own: np.ndarray, base: np.ndarray, exact: np.ndarray) -> float:
    """Largest exact-score difference over pairs of tokens the two selections rank in
    opposite order.  A token a side did not select ranks after everything it selected."""
    union = np.union1d(own, base)
    q = len(base)
    r_own = np.full(union.shape, q, dtype=np.int64)
    r_base = np.full(union.shape, q, dtype=np.int64)
    r_own[np.searchsorted(union, own)] = np.arange(len(own))
    r_base[np.searchsorted(union, base)] = np.arange(q)
    d_own = np.sign(r_own[:, None] - r_own[None, :])
    d_base = np.sign(r_base[:, None] - r_base[None, :])
    inverted = (d_own * d_base) < 0
    if not inverted.any():
        return 0.0
    s = exact[union].astype(np.float64)
    return float(np.abs(s[:, None] - s[None, :])[inverted].max())


def classify_topk(own, base, scores_base, scores_exact, *, k: float, noise_rel: Optional[float] = None
                  ) -> Dict[str, Any]:
    """own, base: int [B, Q] selections; scores_base [B, S]: the base side's scores in the
    run's dtype; scores_exact [B, S]: the float64 reference's (in a float64 comparison, the
    base's own).  noise_rel: float64 comparisons, the noise is noise_rel x max|score|.
    -> {"kind": same|order|tie|flip, "gap", "noise", "images": [per image], ...}"""
    own = np.asarray(own, dtype=np.int64)
    base = np.asarray(base, dtype=np.int64)
    if own.shape != base.shape:
        return {"kind": "flip", "gap": float("inf"), "noise": 0.0, "images": [],
                "reason": f"shape {list(own.shape)} vs {list(base.shape)}"}
    sb = np.asarray(scores_base, dtype=np.float64)
    se = np.asarray(scores_exact, dtype=np.float64)
    images: List[Dict[str, Any]] = []
    for i in range(base.shape[0]):
        o, b = own[i], base[i]
        if np.array_equal(o, b):
            images.append({"image": i, "kind": "same", "gap": 0.0, "noise": 0.0, "moved": 0})
            continue
        scale = float(np.max(np.abs(se[i])))
        if noise_rel is None:
            noise = float(np.max(np.abs(sb[i] - se[i])))
        else:
            noise = noise_rel * scale
        bound = k * noise + 4 * EPS32 * scale * (noise_rel is None)
        gap = _inversion_gap(o, b, se[i])
        same_set = np.array_equal(np.sort(o), np.sort(b))
        kind = ("order" if same_set else "tie") if gap <= bound else "flip"
        images.append({"image": i, "kind": kind, "gap": gap, "noise": noise, "bound": bound,
                       "moved": int((o != b).sum()), "set_diff": int(len(np.setdiff1d(o, b)))})
    return overall(images)


def _assignment_cost(c: np.ndarray, m: np.ndarray) -> float:
    return float(c[m[0], m[1]].sum()) if m.shape[1] else 0.0


def classify_matches(own: Sequence[np.ndarray], base: Sequence[np.ndarray], cost_base: Optional[np.ndarray],
                     cost_exact: Optional[np.ndarray], sizes: Sequence[int], *, k: float,
                     noise_rel: Optional[float] = None) -> Dict[str, Any]:
    """own, base: per image int [2, n] (query, target-in-image); cost_* [B, Q, T] over the
    batch's targets (T = sum(sizes)); noise as in classify_topk.  A different assignment is
    a tie when, under the exact costs, it costs at most k x the cost noise more than the
    base's (the base's own assignment is optimal only up to that noise, too)."""
    images: List[Dict[str, Any]] = []
    if len(own) != len(base):
        return {"kind": "flip", "gap": float("inf"), "noise": 0.0, "images": [],
                "reason": f"{len(own)} vs {len(base)} images"}
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    for i, (o, b) in enumerate(zip(own, base)):
        o = np.asarray(o, dtype=np.int64).reshape(2, -1)
        b = np.asarray(b, dtype=np.int64).reshape(2, -1)
        if o.shape == b.shape and np.array_equal(o, b):
            images.append({"image": i, "kind": "same", "gap": 0.0, "noise": 0.0, "moved": 0})
            continue
        if cost_exact is None or o.shape != b.shape:
            images.append({"image": i, "kind": "flip", "gap": float("inf"), "noise": 0.0,
                           "moved": int(max(o.shape[1], b.shape[1]))})
            continue
        lo, hi = offsets[i], offsets[i + 1]
        ce = np.asarray(cost_exact[i, :, lo:hi], dtype=np.float64)
        cb = np.asarray(cost_base[i, :, lo:hi], dtype=np.float64)
        gap = _assignment_cost(ce, o) - _assignment_cost(ce, b)
        pairs = {tuple(x) for x in o.T} ^ {tuple(x) for x in b.T}       # the pairs that differ
        scale = float(np.max(np.abs(ce))) if ce.size else 0.0
        if noise_rel is None:
            per = np.abs(cb - ce)
            noise = float(sum(per[q, t] for q, t in pairs))
        else:
            noise = noise_rel * scale * len(pairs)
        bound = k * noise + 4 * EPS32 * scale * len(pairs) * (noise_rel is None)
        images.append({"image": i, "kind": "tie" if gap <= bound else "flip", "gap": max(gap, 0.0),
                       "noise": noise, "bound": bound, "moved": len(pairs) // 2})
    return overall(images)


def overall(images: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-image classifications -> the worst kind, with that image's gap and noise."""
    kind = max((im["kind"] for im in images), key=KIND_ORDER.__getitem__, default="same")
    worst = max(images, key=lambda im: (KIND_ORDER[im["kind"]], im["gap"]), default=None)
    return {"kind": kind, "gap": worst["gap"] if worst else 0.0, "noise": worst["noise"] if worst else 0.0,
            "image": worst["image"] if worst else None, "images": images}


def describe(cls: Dict[str, Any]) -> str:
    """``order flip at score gap 3.1e-07 (noise 2.0e-07)``, ``tie at gap ...``, ``FLIP ...``."""
    k = cls["kind"]
    if k == "same":
        return "identical"
    what = {"order": "order flip", "tie": "tie", "flip": "flip beyond float noise"}[k]
    extra = f" (image {cls['image']}, noise {cls['noise']:.2g})" if cls.get("image") is not None else ""
    return f"{what} at gap {cls['gap']:.2g}{extra}"
