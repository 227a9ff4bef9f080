"""COCO metrics of the two sides and their difference (``parity run --stage eval`` and the
train stage's mAP): detections to COCO results (``rtdetr_core.postprocess.to_coco_results``,
labels without a dataset category dropped and counted), pycocotools' 12 metrics, and the
per-metric difference judged against ``eval.max_ap_diff``."""
from __future__ import annotations

import glob
import json
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from rtdetr_core.coco_eval import METRIC_NAMES, evaluate
from rtdetr_core.data.coco import load_coco
from rtdetr_core.postprocess import postprocess, to_coco_results

from parity.fileio import read_npz_meta


def coco_results(dets: Dict[str, np.ndarray], image_ids: Sequence[int],
                 label_to_category: Sequence[int]) -> Tuple[List[Dict[str, Any]], int]:
    """COCO results of stacked detections (``scores`` [N,K], ``labels`` [N,K] contiguous,
    ``boxes`` [N,K,4] xyxy px); labels >= len(label_to_category) have no category and are
    dropped (counted).  Returns ``(results, dropped)``."""
    lut = np.asarray(label_to_category, dtype=np.int64)
    kept, dropped = [], 0
    for i in range(len(image_ids)):
        lab = np.asarray(dets["labels"][i]).astype(np.int64).reshape(-1)
        ok = (lab >= 0) & (lab < len(lut))
        dropped += int((~ok).sum())
        kept.append({"scores": np.asarray(dets["scores"][i], dtype=np.float64).reshape(-1)[ok], "labels": lab[ok],
                     "boxes": np.asarray(dets["boxes"][i], dtype=np.float64).reshape(-1, 4)[ok]})
    return to_coco_results(kept, image_ids, label_to_category=lut), dropped


def eval_passed(diffs: Sequence[Dict[str, Any]], agreement: Dict[str, Any], raw_gate: Dict[str, Any],
                sec: Dict[str, float]) -> bool:
    """The eval stage's verdict: every AP difference within ``max_ap_diff``, the mean per-image
    agreement at least ``min_mean_agreement``, and every batch's raw outputs within the forward
    bound (``raw_gate``, parity/judge/outputs_match.py)."""
    return (all(d["passed"] for d in diffs) and agreement.get("mean_agreement", 1.0) >= sec["min_mean_agreement"]
            and raw_gate["passed"])


def evaluate_file(coco_gt, path: str, img_ids: Optional[Sequence[int]] = None) -> "OrderedDict[str, float]":
    """The 12 COCO metrics of a results file (``rtdetr_core.coco_eval.evaluate``)."""
    with open(path, "r", encoding="utf-8") as fh:
        results = json.load(fh)
    return evaluate(coco_gt, results, img_ids=img_ids)


def metric_diffs(base: Dict[str, float], cand: Dict[str, float], max_diff: float) -> List[Dict[str, Any]]:
    rows = []
    for m in METRIC_NAMES:
        b, c = float(base[m]), float(cand[m])
        if b == -1 and c == -1:
            rows.append({"metric": m, "torch": b, "jittor": c, "diff": 0.0, "passed": True, "skipped": True})
            continue
        d = c - b
        rows.append({"metric": m, "torch": b, "jittor": c, "diff": d, "passed": abs(d) <= max_diff + 1e-12,
                     "skipped": False})
    return rows


def evaluate_side(side_dir: str, manifest: Dict[str, Any], cfg) -> "OrderedDict[int, Dict[str, float]]":
    """COCO metrics of every saved prediction file of a side (numpy post-processing of
    rtdetr_core for both sides: differences come from the models only)."""
    files = sorted(glob.glob(os.path.join(side_dir, "eval", "epoch_[0-9][0-9][0-9][0-9].npz")))
    out: "OrderedDict[int, Dict[str, float]]" = OrderedDict()
    if not files:
        return out
    with np.load(os.path.join(side_dir, "..", "case", "data.npz"), allow_pickle=False) as z:
        l2c = z["label_to_category"]
    gt = load_coco(manifest["data"]["val_ann_file"])
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            meta = read_npz_meta(z)
            dets = postprocess(z["pred_logits"], z["pred_boxes"], z["orig_sizes"],
                               num_top_queries=cfg.postprocess.num_top_queries,
                               use_focal_loss=cfg.postprocess.use_focal_loss)
            ids = [int(i) for i in z["image_ids"]]
        stacked = {k: [d[k] for d in dets] for k in ("scores", "labels", "boxes")}
        # model classes without a dataset category (80-class head, 6-category set) are dropped
        res, dropped = coco_results(stacked, ids, l2c)
        m = evaluate(gt, res, img_ids=ids)
        m = OrderedDict((k, float(v)) for k, v in m.items())
        m["ema"] = bool(meta.get("ema", False))
        m["detections"] = len(res)
        m["dropped_no_category"] = dropped
        out[int(meta.get("epoch", int(os.path.basename(f)[6:10])))] = m
    return out
