"""The engine check of a data-parallel run (``--nproc N``): one side's N-rank run against the
same side's 1-rank run on the same global batch, and what every rank consumed.

What the official distributed rules promise, and what is checked (rules: ``ranks:`` in
thresholds.yaml):

* ``shards``       every rank reports its rank, the world size and the digest of exactly its
                   shard of the case's batch (parity/case/shards.py): no two ranks on the same
                   images, none missing;
* ``ranks_agree``  every rank ends with the same gradients and the same weights after the step
                   (bit for bit: the all-reduce hands every rank the same sum);
* ``losses``       the mean over ranks of each loss term equals the 1-rank term (each rank
                   divides by the all-reduced box count over the world size, so the mean is the
                   global batch's loss);
* ``grads``        rank 0's averaged gradients equal the 1-rank gradients.  Per tensor,
                   ``||d|| / max(||g||, floor * ||g_all||)``: a BatchNorm bias followed by
                   another train-mode BatchNorm has exact gradient 0, computed as ~1e-16 either
                   way, so its own norm cannot be the yardstick;
* ``step``         rank 0's state after one optimiser step (parameters and BN statistics)
                   equals the 1-rank state (rel L2 per tensor; integer counters exact).

A wrong rule shows here: gradients summed instead of averaged double ``grads``; a box count
not reduced moves ``losses``; BN statistics not synced move ``losses`` and ``step``; two
ranks on one shard fail ``shards``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from parity.fileio import read_json, read_npz_meta

ENGINE_CHECKS = ("shards", "ranks_agree", "losses", "grads", "step")


def _load(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files if k != "__meta__"}
        out["__meta__"] = read_npz_meta(z)
    return out


def _rel(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(np.linalg.norm((a - b).ravel()))
    n = max(float(np.linalg.norm(b.ravel())), floor)
    return 0.0 if d == 0 else (d / n if n > 0 else math.inf)


def shard_checks(metas: Sequence[Mapping[str, Any]], expected: Sequence[str]) -> Dict[str, Any]:
    """Each rank's reported shard against the digests the case predicts."""
    n = len(expected)
    rows, bad = [], []
    for r, m in enumerate(metas):
        sh = m.get("shard") or {}
        ok = sh.get("rank") == r and sh.get("world") == n and sh.get("digest") == expected[r]
        rows.append({"rank": r, "reported_rank": sh.get("rank"), "world": sh.get("world"), "images": sh.get("images"),
                     "digest": sh.get("digest"), "expected": expected[r], "ok": ok})
        if not ok:
            same = [o for o, e in enumerate(expected) if e == sh.get("digest") and o != r]
            bad.append(f"rank {r} consumed " + (f"rank {same[0]}'s shard" if same else
                                               "images other than its shard") if sh else f"rank {r} reported no shard")
    return {"ranks": rows, "passed": not bad, "reason": "; ".join(bad) or None}


def engine_check(rank_paths: Sequence[str], one_path: str, expected: Sequence[str], rules: Mapping[str, float],
                 label: str) -> Dict[str, Any]:
    """``label`` (e.g. T64) at N ranks vs its 1-rank run: every check of the module docstring."""
    ranks = [_load(p) for p in rank_paths]
    one = _load(one_path)
    out: Dict[str, Any] = {"label": label, "nproc": len(ranks), "checks": []}

    def add(check: str, value, bound, passed: bool, reason=None, **extra):
        out["checks"].append({"check": check, "value": value, "threshold": bound, "passed": bool(passed),
                              "reason": None if passed else reason, **extra})

    sh = shard_checks([r["__meta__"] for r in ranks], expected)
    add("shards", "every rank on its own shard" if sh["passed"] else sh["reason"], "exact", sh["passed"], sh["reason"],
        ranks=sh["ranks"])

    # every rank holds the same gradients and weights (the all-reduce gives each the same sum)
    keys = [k for k in ranks[0] if k.startswith(("grad/", "step/"))]
    spread, where = 0.0, None
    for r in ranks[1:]:
        for k in keys:
            a, b = np.asarray(ranks[0][k]), r.get(k)
            if b is None or np.shape(b) != a.shape:
                spread, where = math.inf, k
                continue
            d = float(np.max(np.abs(a.astype(np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0
            if not d <= spread:
                spread, where = d, k
    add("ranks_agree", spread, 0.0, spread == 0.0, f"ranks differ by {spread:.3g} in {where}", worst=where)

    losses = [k for k in one if k.startswith("loss")]
    worst, wk = 0.0, None
    for k in losses:
        mean = float(np.mean([float(np.asarray(r[k]).ravel()[0]) for r in ranks]))
        e = _rel(np.asarray(mean), np.asarray(one[k]).ravel()[0])
        if not e <= worst:
            worst, wk = e, k
    add("losses", worst, rules["loss_rel"], worst <= rules["loss_rel"],
        f"mean over ranks of {wk} off by {worst:.3g} relative", worst_at=wk)

    grads = [k for k in one if k.startswith("grad/")]
    g_all = math.sqrt(sum(float(np.sum(np.asarray(one[k], np.float64) ** 2)) for k in grads))
    floor = rules["grad_floor"] * g_all
    worst, wk = 0.0, None
    for k in grads:
        e = _rel(ranks[0][k], one[k], floor)
        if not e <= worst:
            worst, wk = e, k
    add("grads", worst, rules["grad_rel"], worst <= rules["grad_rel"],
        f"{wk[5:] if wk else '?'} off by {worst:.3g} (relative, floor {rules['grad_floor']:g} x the whole gradient)",
        worst_at=wk, whole_gradient_norm=g_all)

    steps = [k for k in one if k.startswith("step/")]
    worst, wk, ints = 0.0, None, []
    for k in steps:
        a, b = ranks[0].get(k), one[k]
        if a is None or np.shape(a) != np.shape(b):
            worst, wk = math.inf, k
            break
        if np.asarray(b).dtype.kind in "iub":
            if not np.array_equal(a, b):
                ints.append(k)
            continue
        e = _rel(a, b)
        if not e <= worst:
            worst, wk = e, k
    ok = worst <= rules["step_rel"] and not ints
    add("step", worst, rules["step_rel"], ok,
        f"integer state differs: {ints[0]}" if ints else f"{wk[5:] if wk else '?'} off by {worst:.3g} relative",
        worst_at=wk)
    out["passed"] = all(c["passed"] for c in out["checks"])
    return out


def summary_lines(checks: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per engine check, for the terminal."""
    lines = []
    for c in checks:
        v = c["value"]
        val = f"{v:.3g}" if isinstance(v, float) else str(v)
        th = c["threshold"]
        lines.append(f"    {'ok  ' if c['passed'] else 'FAIL'} {c['check']:<12} {val}"
                     + (f" (max {th:.3g})" if isinstance(th, float) and th > 0 else ""))
    return lines


def train_rank_checks(side_dir: str, label: str, expected: Mapping[int, Sequence[str]], iterations: Sequence[int]
                      ) -> Dict[str, Any]:
    """A train side run on N ranks: every rank reported exactly its shard at every iteration the
    side logged (``ranks/rank<r>.json``, parity/workers/train_ranks.py)."""
    nproc = len(next(iter(expected.values()))) if expected else 0
    c: Dict[str, Any] = {"check": f"shards_{label}", "text": f"every rank of {label} consumed exactly its shard",
                         "rule": "exact", "nproc": nproc}
    bad = None
    for r in range(nproc):
        path = os.path.join(side_dir, "ranks", f"rank{r}.json")
        try:
            got = {int(i): d for i, d in read_json(path).get("digests", [])}
        except (OSError, ValueError):
            bad = f"rank {r} of {label} wrote no shard record ({path})"
            break
        for it in iterations:
            want = expected.get(int(it))
            if want is None or got.get(int(it)) != want[r]:
                other = [o for o, w in enumerate(want or []) if w == got.get(int(it)) and o != r]
                bad = (f"rank {r} of {label} consumed " + (f"rank {other[0]}'s shard" if other else "other images")
                       + f" at iteration {it}")
                break
        if bad:
            break
    c.update(value=bad is None, passed=bad is None)
    if bad:
        c["reason"] = bad
    return c
