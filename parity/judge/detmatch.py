"""Detection-level agreement of two backends (``parity detect`` and ``parity run --stage eval``).

Two lists of detections of the same image (``base`` = PyTorch, ``cand`` = Jittor; each
``{"scores" [n], "labels" [n], "boxes" [n, 4] xyxy px}``, already filtered by score) are
paired by a one-to-one assignment that maximises the summed IoU (scipy's Hungarian solver);
a pair counts as *matched* when its IoU is at least ``match_iou``.  Labels are NOT used for
pairing, so a label flip shows up as a matched pair whose labels disagree.  Per image:

* ``n_base``, ``n_cand``      detections above the score threshold
* ``matched``                 pairs with IoU >= match_iou
* ``mean_iou``, ``min_iou``   over the matched pairs (1.0 when nothing to match)
* ``max_score_diff``          max |score_cand - score_base| over the matched pairs
* ``label_agreement``         fraction of matched pairs with the same label
* ``agreement``               matched pairs with the same label / max(n_base, n_cand)
                              (1.0 when both are empty): the single number images are
                              ranked by (the most disagreeing images have the lowest)

Thresholds: the ``detect:`` and ``eval:`` sections of ``parity/thresholds.yaml``
(``load_thresholds(path).section(name)``, parity/judge/thresholds.py).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Sequence

import numpy as np

from parity.judge.compare import judge_tensor
from parity.judge.outputs_match import align_batch, selection_of



def box_iou_safe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes [N,4] x [M,4] in float64; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def filter_dets(det: Mapping[str, np.ndarray], score_threshold: float) -> Dict[str, np.ndarray]:
    s = np.asarray(det["scores"]).reshape(-1)
    keep = s >= score_threshold
    return {"scores": s[keep], "labels": np.asarray(det["labels"]).reshape(-1)[keep],
            "boxes": np.asarray(det["boxes"]).reshape(-1, 4)[keep]}


def match_detections(base: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
                     match_iou: float = 0.5) -> Dict[str, Any]:
    """Agreement of two detection lists of one image (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment
    nb, nc = len(np.asarray(base["scores"]).reshape(-1)), len(np.asarray(cand["scores"]).reshape(-1))
    out: Dict[str, Any] = {"n_base": nb, "n_cand": nc, "matched": 0, "mean_iou": 1.0, "min_iou": 1.0,
                           "max_score_diff": 0.0, "label_agreement": 1.0, "agreement": 1.0}
    if nb == 0 or nc == 0:
        out["agreement"] = 1.0 if nb == nc else 0.0
        return out
    iou = box_iou_safe(base["boxes"], cand["boxes"])
    rows, cols = linear_sum_assignment(-iou)
    ok = iou[rows, cols] >= match_iou
    rows, cols = rows[ok], cols[ok]
    m = len(rows)
    out["matched"] = m
    if m == 0:
        out.update(mean_iou=0.0, min_iou=0.0, label_agreement=0.0, agreement=0.0)
        return out
    ious = iou[rows, cols]
    same = np.asarray(base["labels"]).reshape(-1)[rows] == np.asarray(cand["labels"]).reshape(-1)[cols]
    sd = np.abs(np.asarray(base["scores"], dtype=np.float64).reshape(-1)[rows]
                - np.asarray(cand["scores"], dtype=np.float64).reshape(-1)[cols])
    out.update(mean_iou=float(ious.mean()), min_iou=float(ious.min()), max_score_diff=float(sd.max()),
               label_agreement=float(same.mean()), agreement=float(same.sum()) / max(nb, nc))
    return out


def summarize(per_image: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Totals over images: detections, matched, mean agreement / IoU, worst score diff."""
    rows = list(per_image)
    if not rows:
        return {"images": 0}
    nb = sum(r["n_base"] for r in rows)
    nc = sum(r["n_cand"] for r in rows)
    matched = sum(r["matched"] for r in rows)
    with_matches = [r for r in rows if r["matched"]]
    return {
        "images": len(rows),
        "n_base": nb, "n_cand": nc, "matched": matched,
        "mean_agreement": float(np.mean([r["agreement"] for r in rows])),
        "min_agreement": float(min(r["agreement"] for r in rows)),
        "images_fully_agreeing": int(sum(1 for r in rows if r["agreement"] == 1.0)),
        "mean_iou": float(np.mean([r["mean_iou"] for r in with_matches])) if with_matches else 1.0,
        "min_iou": float(min(r["min_iou"] for r in with_matches)) if with_matches else 1.0,
        "max_score_diff": float(max(r["max_score_diff"] for r in rows)),
        "label_agreement": (float(sum(r["label_agreement"] * r["matched"] for r in with_matches) / matched)
                            if matched else 1.0),
    }


def worst(rows: List[Dict[str, Any]], n: int) -> List[Dict[str, Any]]:
    """The ``n`` most disagreeing rows: lowest agreement, then largest score difference."""
    return sorted(rows, key=lambda r: (r["agreement"], -r["max_score_diff"], -abs(r["n_base"] - r["n_cand"])))[:n]


def judge_detect(cand: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], names: Sequence[str],
                 image_ids: Sequence[int], conf: float, outputs_threshold, sec: Mapping[str, float]):
    """``parity detect``: the raw outputs judged with the forward bound (a top-k tie flip paired
    by encoder token first, parity/judge/outputs_match.py: ``cand`` / ``base`` hold each side's
    ``topk_index`` / ``topk_scores``) and every image's detections >= ``conf`` matched ->
    ``(passed, raw outputs, per-image rows, summary)``."""
    passed, raw_cmp, rows = True, [], []
    keys = ("pred_logits", "pred_boxes")
    c_raw, b_raw = {k: cand[k] for k in keys}, {k: base[k] for k in keys}
    es = [judge_tensor(k, "outputs", c_raw[k], b_raw[k], th=outputs_threshold) for k in keys]
    flip = None
    if not all(e["passed"] for e in es):
        # a float32 near-tie of the encoder's top-k reorders (or swaps at the boundary)
        # queries: pair them by encoder token, report the flip, judge the rest
        c_al, b_al, flip = align_batch(c_raw, b_raw, index=tuple(selection_of(x) for x in (cand, base)))
        if flip is not None:
            es = [judge_tensor(k, "outputs", c_al[k], b_al[k], th=outputs_threshold) for k in keys]
    for e in es:
        raw_cmp.append({k: e[k] for k in ("name", "passed", "rule", "err", "cos", "shape", "threshold")
                        if k in e} | {"max_abs": e["errors"]["cand_base"]["max_abs"],
                                      **({"reason": e["reason"]} if "reason" in e else {}),
                                      **({"tie_flip": flip} if flip else {})})
        passed &= bool(e["passed"])
    for i in range(len(names)):
        b = filter_dets({k: base[k][i] for k in ("scores", "labels", "boxes")}, conf)
        c = filter_dets({k: cand[k][i] for k in ("scores", "labels", "boxes")}, conf)
        r = match_detections(b, c, sec["match_iou"])
        rows.append({"image": names[i], "image_id": image_ids[i], **r})
    summary_ag = summarize(rows)
    if rows and summary_ag["min_agreement"] < sec["min_agreement"]:
        passed = False
    return passed, raw_cmp, rows, summary_ag
