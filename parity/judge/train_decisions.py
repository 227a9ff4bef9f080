"""The train stage's discrete decisions: where two sides first chose differently, and whether
that choice was a tie or a real difference.

Each side logs its top-k index ``[b, Q]`` and its assignments per loss call every iteration
(parity/workers/train_decisions.py).  Raw arrays differ far more often than the choices do:
two ports order exactly or nearly tied scores differently inside the top-k, and then every
assignment names other query rows for the same tokens.  The decoder is equivariant to the order
of its queries (tests/test_query_order.py), so decisions are compared in a canonical form:

* the top-k **set** of encoder tokens per image;
* each assignment as (token, target) pairs, the query row mapped to its token.

The first iteration where that form differs is a divergence.  It is classified with
parity/judge/decisions.py from probes (the runner replays the sides to that iteration and
records the evidence): the base side's float32 scores and costs, and the float64 reference
side's as the exact values, so that the noise is float32's own at that point of training
(T32 vs T64: arithmetic plus the trajectory drift the curves are judged against).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from parity.judge import decisions as D

Canon = Tuple[FrozenSet[int], Dict[str, FrozenSet[Tuple[int, int]]]]


def side_epochs(side_dir: str, rank: int = 0) -> List[int]:
    files = glob.glob(os.path.join(side_dir, "decisions", f"epoch_*.rank{rank}.npz"))
    return sorted(int(re.search(r"epoch_(\d+)", os.path.basename(f)).group(1)) for f in files)


def read_epoch(side_dir: str, epoch: int, rank: int) -> Dict[int, Dict[str, Any]]:
    """iteration -> {"topk_index": [b, Q], "matches": {call: [[2, n] per image]}}."""
    path = os.path.join(side_dir, "decisions", f"epoch_{epoch:04d}.rank{rank}.npz")
    out: Dict[int, Dict[str, Any]] = {}
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            if k == "__meta__":
                continue
            it, rest = k.split("/", 1)
            d = out.setdefault(int(it), {"topk_index": None, "matches": {}})
            if rest == "topk_index":
                d["topk_index"] = z[k]
            else:
                _, call, img = rest.split("/")
                d["matches"].setdefault(call, {})[int(img)] = z[k]
    for d in out.values():
        d["matches"] = {c: [v[i] for i in sorted(v)] for c, v in d["matches"].items()}
    return out


def canonical(dec: Dict[str, Any], image: int) -> Canon:
    """One image's decisions without the query order: top-k token set, (token, target) pairs."""
    topk = np.asarray(dec["topk_index"])[image]
    calls = {}
    for call, per_image in dec["matches"].items():
        m = np.asarray(per_image[image]).reshape(2, -1)
        calls[call] = frozenset((int(topk[q]), int(t)) for q, t in m.T)
    return frozenset(int(x) for x in topk), calls


def compare_iteration(cand: Dict[str, Any], base: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """None when the choices agree (also when only the order inside the top-k differs),
    else {"image", "what": "topk" | "match/<call>", "order_only_images"}."""
    if np.asarray(cand["topk_index"]).shape != np.asarray(base["topk_index"]).shape:
        return {"image": 0, "what": "topk"}
    for i in range(np.asarray(base["topk_index"]).shape[0]):
        sc, mc = canonical(cand, i)
        sb, mb = canonical(base, i)
        if sc != sb:
            return {"image": i, "what": "topk"}
        for call in mb:
            if mc.get(call) != mb[call]:
                return {"image": i, "what": f"match/{call}"}
    return None


def iterate(cand_dir: str, base_dir: str, ranks: int) -> Iterator[Tuple[int, int, Dict[str, Any], Dict[str, Any]]]:
    """(iteration, rank, cand decisions, base decisions) in iteration order, over the epochs
    both sides logged."""
    for epoch in sorted(set(side_epochs(cand_dir)) & set(side_epochs(base_dir))):
        per_rank = [(read_epoch(cand_dir, epoch, r), read_epoch(base_dir, epoch, r)) for r in range(ranks)]
        for it in sorted(per_rank[0][1]):
            for r, (c, b) in enumerate(per_rank):
                if it in c and it in b:
                    yield it, r, c[it], b[it]


def divergences(cand_dir: str, base_dir: str, ranks: int = 1, after: int = 0) -> Dict[str, Any]:
    """The iterations (after ``after``) whose canonical choices differ: the first one in full,
    and counts.  {"compared", "order_only", "diverged", "first": {...} | None}."""
    compared = order_only = 0
    first, diverged = None, []
    for it, r, c, b in iterate(cand_dir, base_dir, ranks):
        if it <= after:
            continue
        compared += 1
        diff = compare_iteration(c, b)
        if diff is None:
            if not np.array_equal(c["topk_index"], b["topk_index"]):
                order_only += 1
            continue
        if it not in diverged:
            diverged.append(it)
        if first is None:
            first = dict(diff, iteration=it, rank=r)
    return {"compared": compared, "order_only": order_only, "diverged": len(diverged),
            "diverged_iterations": diverged[:50], "first": first}


# ----------------------------------------------------------------------------------------
# classification from probes
# ----------------------------------------------------------------------------------------

def _rows_by_token(topk: np.ndarray) -> Dict[int, int]:
    return {int(t): q for q, t in enumerate(topk)}


def _cost_in_rows(cost: np.ndarray, topk_from: np.ndarray, topk_to: np.ndarray) -> Optional[np.ndarray]:
    """A side's cost matrix [Q, T] (rows in its top-k order) re-indexed to another top-k's rows;
    None when a token of ``topk_to`` is missing from ``topk_from``."""
    rows = _rows_by_token(topk_from)
    try:
        return cost[[rows[int(t)] for t in topk_to]]
    except KeyError:
        return None


def classify(cand: Dict[str, Any], base_probe: Dict[str, np.ndarray], ref_probe: Dict[str, np.ndarray],
             tie_k: float) -> Dict[str, Any]:
    """Classify the candidate's choice at one iteration (one rank) against the base's.

    cand: the candidate's logged decisions; base_probe / ref_probe: probe arrays of the base
    side (float32) and the reference (float64) at that iteration (``own/...``, ``evidence/...``).
    -> {"kind": order|tie|flip, "topk": classification, "matches": {call: classification}}."""
    base = probe_decisions(base_probe)
    ref_topk = np.asarray(ref_probe["own/topk_index"])
    ct, bt = np.asarray(cand["topk_index"]), np.asarray(base["topk_index"])
    out: Dict[str, Any] = {"topk": D.classify_topk(ct, bt, base_probe["evidence/topk_scores"],
                                                   ref_probe["evidence/topk_scores"], k=tie_k),
                           "matches": {}}
    for call, b_list in base["matches"].items():
        c_list = cand["matches"].get(call, [])
        per_image = []
        for i in range(bt.shape[0]):
            # in the base's query rows; when the sets differ the assignment follows the top-k
            # choice (its tokens have no base row), so only the top-k is judged
            if frozenset(ct[i].tolist()) != frozenset(bt[i].tolist()):
                continue
            row_of = _rows_by_token(bt[i])
            c_m = np.asarray(c_list[i]).reshape(2, -1)
            c_rows = np.stack([[row_of[int(ct[i][q])] for q in c_m[0]], c_m[1]]).reshape(2, -1).astype(np.int64)
            b_m = np.asarray(b_list[i]).reshape(2, -1)
            key = f"evidence/match_cost/{call}"
            if key not in base_probe or key not in ref_probe:
                per_image.append((c_rows, b_m, None, None, i))
                continue
            cb = np.asarray(base_probe[key])[i]
            ce = _cost_in_rows(np.asarray(ref_probe[key])[i], ref_topk[i], bt[i])
            per_image.append((c_rows, b_m, cb, ce, i))
        if not per_image:
            continue
        cls_images = []
        for c_rows, b_m, cb, ce, i in per_image:
            one = D.classify_matches([c_rows], [b_m], None if cb is None else cb[None],
                                     None if ce is None else ce[None], [cb.shape[-1] if cb is not None else 0],
                                     k=tie_k)
            cls_images.extend(dict(im, image=i) for im in one["images"])
        out["matches"][call] = D.overall(cls_images)
    kinds = [out["topk"]["kind"]] + [c["kind"] for c in out["matches"].values()]
    out["kind"] = max(kinds, key=D.KIND_ORDER.__getitem__)
    return out


def probe_decisions(probe: Dict[str, np.ndarray]) -> Dict[str, Any]:
    matches: Dict[str, Dict[int, np.ndarray]] = {}
    for k, v in probe.items():
        if k.startswith("own/match/"):
            call, img = k[len("own/match/"):].rsplit("/", 1)
            matches.setdefault(call, {})[int(img)] = v
    return {"topk_index": probe["own/topk_index"],
            "matches": {c: [v[i] for i in sorted(v)] for c, v in matches.items()}}


def read_probe(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "__meta__"}


def follow_arrays(base_dir: str, iterations: Sequence[int], ranks: int) -> Dict[str, np.ndarray]:
    """The base side's logged decisions at ``iterations``, as a --follow file's arrays
    (keys ``r<rank>/<it>/...``)."""
    want = set(int(i) for i in iterations)
    out: Dict[str, np.ndarray] = {}
    for epoch in side_epochs(base_dir):
        for r in range(ranks):
            path = os.path.join(base_dir, "decisions", f"epoch_{epoch:04d}.rank{r}.npz")
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    if k != "__meta__" and int(k.split("/", 1)[0]) in want:
                        out[f"r{r}/{k}"] = z[k]
    return out
