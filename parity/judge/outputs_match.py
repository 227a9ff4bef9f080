"""Raw detection outputs of two backends, compared query by query with a tie-tolerant pairing.

Used by ``parity run --stage eval`` (per streamed batch, forward thresholds) and by the train
stage (the eval-mode outputs of both sides' trained weights on the val images).

Why a pairing: the decoder's queries are the encoder's top-k proposals in score order.  Two
correct float32 ports can round two near-equal encoder scores differently, so the same
queries come out in another order (an *order flip*), or, at the top-k boundary, one side
keeps a query the other drops (a *set flip*).  The decoder is permutation-equivariant over
queries, so an order flip only permutes rows; comparing row i with row i would then fail a
correct port.  The rule (kept simple on purpose):

1. the arrays are first compared row by row; only when that fails (eval stage), or when the
   pairing lowers the error (train stage), is the pairing used.  Per image, rows (queries)
   are paired by the encoder token each query came from when both sides recorded their
   top-k indices and each side's selection is in its own score order (``index``: exact; all
   stages that save it), else by mutual nearest neighbour on the concatenated
   ``(logits, box)`` row (L2);
2. rows paired with another position count as *moved*, rows without a partner as
   *unmatched*.  A tie flip is, per image, ``unmatched <= max_tie_rows`` when paired by token
   (any number of moved rows: the same queries in another order), or ``moved + unmatched <=
   max_tie_rows`` when paired by nearest neighbour (a heuristic, so kept small).  The paired
   rows are then compared in the paired order, and the unmatched ones are only reported
   (with their scores); more is no tie (the plain row-by-row comparison stands);
3. the thresholds then judge the compared arrays as usual: a genuine difference still fails.

A set flip also perturbs the other queries a little (self-attention sees a different set);
when that perturbation exceeds the threshold the batch fails, and the report names the flip.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from parity.judge.compare import judge_tensor


KEYS = ("pred_logits", "pred_boxes")
DEFAULT_MAX_TIE_ROWS = 4
# one side's top-k selection: (token indices [B, Q] int64, top-k scores [B, Q])
Selection = Tuple[np.ndarray, np.ndarray]


def _sigmoid_max(logits: np.ndarray) -> np.ndarray:
    """The detection score of each row (focal-loss head: sigmoid of the best class logit)."""
    m = np.max(np.asarray(logits, dtype=np.float64), axis=-1)
    return 1.0 / (1.0 + np.exp(-m))


def pair_rows(cand: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``partner[i]`` = the base row paired with cand row ``i`` (mutual nearest neighbour in
    float64 L2), or -1.  ``cand``, ``base``: [Q, D]."""
    a = np.asarray(cand, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    d = np.where(np.isfinite(d), d, np.inf)
    nn_ab = np.argmin(d, axis=1)
    nn_ba = np.argmin(d, axis=0)
    partner = np.full(len(a), -1, dtype=np.int64)
    mutual = nn_ba[nn_ab] == np.arange(len(a))
    partner[mutual] = nn_ab[mutual]
    return partner


def selection_of(saved) -> Optional[Selection]:
    """One side's saved top-k selection (``topk_index``, ``topk_scores`` of a worker's output
    file or its arrays; ``parity/workers/topk_capture.py``), or None when it saved none."""
    return (saved["topk_index"], saved["topk_scores"]) if "topk_index" in saved else None


def sorted_selection(scores: np.ndarray) -> bool:
    """Each image's top-k scores [B, Q] are in non-increasing order: the side's query order is
    the one its own scores give, so any order difference between the sides is explained by
    their score differences (a bug that reorders queries, e.g. a reversed selection, is not)."""
    s = np.asarray(scores, dtype=np.float64)
    return bool(s.ndim == 2 and np.all(np.diff(s, axis=1) <= 0))


def pair_by_index(cand_idx: np.ndarray, base_idx: np.ndarray) -> np.ndarray:
    """``partner[i]`` = the base row whose query came from the same encoder token as cand row
    ``i``, or -1.  ``cand_idx``, ``base_idx``: [Q] top-k token indices of one image."""
    pos = {int(t): j for j, t in enumerate(np.asarray(base_idx).reshape(-1))}
    return np.array([pos.get(int(t), -1) for t in np.asarray(cand_idx).reshape(-1)], dtype=np.int64)


def align_batch(cand: Dict[str, np.ndarray], base: Dict[str, np.ndarray],
                max_tie_rows: int = DEFAULT_MAX_TIE_ROWS,
                index: Optional[Tuple[Selection, Selection]] = None) -> Tuple[Dict[str, np.ndarray],
                                                                                Dict[str, np.ndarray],
                                                                                Optional[Dict[str, Any]]]:
    """``(cand_cmp, base_cmp, flip)``: the arrays to compare and, when a tie flip was
    recognised, what it was (``None``: compared row by row).  Inputs ``{"pred_logits" [B,Q,C],
    "pred_boxes" [B,Q,4]}`` and optionally ``index`` = ((cand token indices [B,Q], cand top-k
    scores [B,Q]), (the same for base)), either None when that side saved none;
    with a flip the outputs are [N,C] / [N,4] (the paired rows of every image, base order)."""
    cl, cb = np.asarray(cand["pred_logits"]), np.asarray(cand["pred_boxes"])
    bl, bb = np.asarray(base["pred_logits"]), np.asarray(base["pred_boxes"])
    if cl.shape != bl.shape or cb.shape != bb.shape or cl.ndim != 3 or cl.shape[:2] != cb.shape[:2]:
        return cand, base, None                # a shape mismatch fails as it is
    images: List[Dict[str, Any]] = []
    rows_c: List[np.ndarray] = []
    rows_b: List[np.ndarray] = []
    # pair by token only when both sides' selections are in their own score order
    by_index = index is not None and all(x is not None and np.shape(x[0]) == cl.shape[:2] and np.shape(x[1]) == cl.shape[:2]
                                         and sorted_selection(x[1]) for x in index)
    for i in range(cl.shape[0]):
        if by_index:
            partner = pair_by_index(index[0][0][i], index[1][0][i])
        else:
            partner = pair_rows(np.concatenate([cl[i], cb[i]], 1), np.concatenate([bl[i], bb[i]], 1))
        q = np.arange(len(partner))
        paired = partner >= 0
        moved = int(np.sum(paired & (partner != q)))
        unmatched = int(np.sum(~paired))
        if unmatched + (0 if by_index else moved) > max_tie_rows:
            return cand, base, None            # not a tie: the plain comparison decides
        if moved or unmatched:
            sc, sb = _sigmoid_max(cl[i]), _sigmoid_max(bl[i])
            only_b = np.setdiff1d(q, partner[paired])
            ent = {"image": i, "moved": moved, "unmatched": unmatched,
                   "cand_only_scores": [float(s) for s in sc[~paired]],
                   "base_only_scores": [float(s) for s in sb[only_b]],
                   "moved_rows": [int(r) for r in q[paired & (partner != q)]][:8]}
            # score gap: how far apart the two sides' extra queries score (a boundary tie keeps
            # two low, close scores); for a pure order flip the largest score difference of
            # the rows that changed place (same queries: ~0)
            if unmatched:
                ent["score_gap"] = abs(max(ent["cand_only_scores"]) - max(ent["base_only_scores"]))
            else:
                mv = paired & (partner != q)
                ent["score_gap"] = float(np.max(np.abs(sc[mv] - sb[partner[mv]])))
            images.append(ent)
        rows_c.append(q[paired])
        rows_b.append(partner[paired])
    if not images:
        return cand, base, None
    c_out = {"pred_logits": np.concatenate([cl[i][r] for i, r in enumerate(rows_c)]),
             "pred_boxes": np.concatenate([cb[i][r] for i, r in enumerate(rows_c)])}
    b_out = {"pred_logits": np.concatenate([bl[i][r] for i, r in enumerate(rows_b)]),
             "pred_boxes": np.concatenate([bb[i][r] for i, r in enumerate(rows_b)])}
    kind = "set" if any(e["unmatched"] for e in images) else "order"
    flip = {"kind": kind, "paired_by": "token" if by_index else "nearest", "images": images,
            "score_gap": max(e["score_gap"] for e in images)}
    return c_out, b_out, flip


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0, inf when only b is; inf on NaN/shape)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return 0.0 if a.shape == b.shape and np.array_equal(a, b, equal_nan=True) else math.inf
    nd, nb = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if nd == 0.0:
        return 0.0
    return nd / nb if nb > 0 else math.inf


def outputs_rel(cand: Dict[str, np.ndarray], base: Dict[str, np.ndarray],
                max_tie_rows: int = DEFAULT_MAX_TIE_ROWS,
                index: Optional[Tuple[Selection, Selection]] = None) -> Dict[str, Any]:
    """rel L2 of pred_logits and pred_boxes (train stage metric): row by row, or after the
    tie pairing when that is lower (a recognised tie flip; reported in ``flip``).  ``index``:
    per side (top-k token indices [B,Q], top-k scores [B,Q]): pair by token, not by nearest
    neighbour."""
    out: Dict[str, Any] = {k: rel_l2(cand[k], base[k]) for k in KEYS}
    out["worst"], out["flip"] = max(out[k] for k in KEYS), None
    c, b, flip = align_batch(cand, base, max_tie_rows, index)
    if flip is not None:
        al = {k: rel_l2(c[k], b[k]) for k in KEYS}
        if max(al.values()) < out["worst"]:
            out.update(al, worst=max(al.values()), flip=flip)
    return out


class OutputsGate:
    """Streaming judgement of raw outputs (eval stage): one batch at a time, nothing kept but
    the worst error per key, the failing batches and the tie flips (first few of each)."""

    def __init__(self, th, max_tie_rows: int = DEFAULT_MAX_TIE_ROWS, keep: int = 10):
        self.th, self.max_tie_rows, self.keep = th, int(max_tie_rows), keep
        self.worst = {k: {"rel_l2": 0.0, "max_abs": 0.0, "batch": None} for k in KEYS}
        self.batches = 0
        self.failed: List[Dict[str, Any]] = []
        self.n_failed = 0
        self.flips: List[Dict[str, Any]] = []
        self.n_flips = 0

    def _judge(self, c: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> List[Dict[str, Any]]:
        return [judge_tensor(k, "outputs", c[k], b[k], th=self.th) for k in KEYS]

    def add(self, batch: int, cand: Dict[str, np.ndarray], base: Dict[str, np.ndarray],
            index: Optional[Tuple[Selection, Selection]] = None) -> bool:
        """Judge one batch: row by row first; only when that fails, after the tie pairing
        (by token when ``index`` holds both sides' selections)."""
        self.batches += 1
        es = self._judge(cand, base)
        flip = None
        if not all(e["passed"] for e in es):
            c, b, flip = align_batch(cand, base, self.max_tie_rows, index)
            if flip is not None:
                es = self._judge(c, b)
        ok = all(e["passed"] for e in es)
        for k, e in zip(KEYS, es):
            if e["err"] > self.worst[k]["rel_l2"]:
                self.worst[k].update(rel_l2=float(e["err"]), batch=batch)
            self.worst[k]["max_abs"] = max(self.worst[k]["max_abs"], float(e["errors"]["cand_base"]["max_abs"]))
        if flip is not None:
            self.n_flips += 1
            if len(self.flips) < self.keep:
                self.flips.append({"batch": batch, "passed": ok, **flip})
        if not ok:
            self.n_failed += 1
            if len(self.failed) < self.keep:
                self.failed.append({"batch": batch, "tie_flip": flip["kind"] if flip else None,
                                    "reason": "; ".join(f"{k}: {e.get('reason', 'failed')}"
                                                        for k, e in zip(KEYS, es) if not e["passed"])})
        return ok

    def summary(self) -> Dict[str, Any]:
        passed = self.n_failed == 0 and self.batches > 0
        if self.batches == 0:
            reason = "no batch compared"
        elif self.n_failed:
            f = self.failed[0]
            reason = (f"{self.n_failed} of {self.batches} batch(es) beyond the forward output threshold, "
                      f"first batch {f['batch']}: {f['reason']}")
        else:
            reason = None
        return {"passed": passed, "batches": self.batches, "failed_batches": self.n_failed, "failed": self.failed,
                "tie_flips": self.n_flips, "flips": self.flips, "max_tie_rows": self.max_tie_rows,
                "worst": self.worst, "threshold": self.th.to_dict(), "reason": reason}
