"""Hungarian assignment on cost matrices handed over by a backend.

Both backends compute the matching cost in their own framework, then call
:func:`hungarian_match` here, so the discrete assignment is solved by one routine
(scipy's ``linear_sum_assignment``).  With ``--share-decisions`` the harness instead feeds
one side's result to the other (a 1e-7 cost change can flip a tied assignment).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment


def hungarian_match(cost: np.ndarray, sizes: Sequence[int]) -> List[np.ndarray]:
    """Per-image optimal assignment.

    cost:  [B, Q, T] matching cost of every query against every target of the *batch*
           (targets of all images concatenated, T = sum(sizes)).
    sizes: number of targets of each image.
    Returns, per image, an int64 array [2, n] (row 0 = query index, row 1 = target index
    within the image), sorted by query index, as the official matcher returns them.
    """
    cost = np.asarray(cost)
    if not np.all(np.isfinite(cost)):
        raise ValueError("matching cost contains NaN or inf")
    out = []
    start = 0
    for b, n in enumerate(sizes):
        c = cost[b, :, start:start + n]
        start += n
        rows, cols = linear_sum_assignment(c)
        out.append(np.stack([rows.astype(np.int64), cols.astype(np.int64)]))
    return out


def agreement(a: List[np.ndarray], b: List[np.ndarray]) -> Tuple[int, int]:
    """(pairs equal in both, pairs in total) between two per-image assignments."""
    same = total = 0
    for x, y in zip(a, b):
        sx = {(int(q), int(t)) for q, t in x.T}
        sy = {(int(q), int(t)) for q, t in y.T}
        same += len(sx & sy)
        total += max(len(sx), len(sy))
    return same, total
