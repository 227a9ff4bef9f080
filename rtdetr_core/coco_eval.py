"""COCO bbox evaluation with pycocotools, returning the 12 standard metrics by name.

``evaluate(coco_gt, results)`` → ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
"AR10", "AR100", "ARs", "ARm", "ARl"}`` (floats, in that order, pycocotools' ``stats``).
As pycocotools, a metric with no ground truth in its range is -1.  pycocotools' prints are
silenced unless ``verbose``.  An empty result list is valid (no detections: AP 0).
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .data.coco import coco_from_dict, load_coco, quiet
from .data.errors import DataError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _as_coco(coco_gt, verbose: bool):
    from pycocotools.coco import COCO
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        return load_coco(os.fspath(coco_gt), verbose=verbose)
    if hasattr(coco_gt, "coco") and isinstance(coco_gt.coco, COCO):   # a CocoDetection
        return coco_gt.coco
    raise TypeError(f"coco_gt must be a pycocotools COCO, an annotation file path or a dataset "
                    f"with a .coco attribute, got {type(coco_gt).__name__}")


def _check_results(coco_gt, results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    cat_ids = set(coco_gt.getCatIds())
    img_ids = set(coco_gt.getImgIds())
    out = []
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in r:
                raise DataError(f"results[{i}]: missing key '{key}'")
        if int(r["image_id"]) not in img_ids:
            raise DataError(f"results[{i}]: image_id {r['image_id']} is not in the ground truth")
        if int(r["category_id"]) not in cat_ids:
            raise DataError(f"results[{i}]: category_id {r['category_id']} is not in the ground truth "
                            f"categories (labels not mapped to category ids?)")
        try:
            bb = [float(v) for v in (r["bbox"] if type(r["bbox"]) in (list, tuple)
                                     else np.asarray(r["bbox"], dtype=np.float64).reshape(-1))]
        except (TypeError, ValueError):
            bb = []
        if len(bb) != 4:
            raise DataError(f"results[{i}]: bbox must be [x, y, w, h] numbers, got {r['bbox']!r}")
        out.append({"image_id": int(r["image_id"]), "category_id": int(r["category_id"]),
                    "bbox": bb, "score": float(r["score"])})
    return out


def _load_results(coco_gt, results: List[Dict[str, Any]], verbose: bool):
    """``coco_gt.loadRes(results)``, also for an empty list (which loadRes cannot take)."""
    if results:
        with quiet(not verbose):
            return coco_gt.loadRes(results)       # fresh dicts from _check_results: may be mutated
    data = {"images": list(coco_gt.dataset.get("images", [])),
            "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
            "annotations": []}
    return coco_from_dict(data, verbose=verbose)


def evaluate(coco_gt: Union[str, os.PathLike, Any], results: Sequence[Dict[str, Any]], *,
             img_ids: Optional[Sequence[int]] = None, verbose: bool = False,
             per_category: bool = False) -> "OrderedDict[str, Any]":
    """The 12 COCO bbox metrics of ``results`` (``loadRes`` dicts: image_id, category_id,
    bbox xywh in pixels, score) against ``coco_gt`` (a ``COCO``, an annotation file path or
    a ``CocoDetection``).

    ``img_ids``: evaluate on these images only (default: every image of ``coco_gt``).
    ``per_category``: also return ``"per_category": {name: AP}`` (AP@[.5:.95], area all,
    100 detections; -1 for a category without ground truth).
    """
    from pycocotools.cocoeval import COCOeval
    gt = _as_coco(coco_gt, verbose)
    res = _check_results(gt, results)
    dt = _load_results(gt, res, verbose)
    with quiet(not verbose):
        ev = COCOeval(gt, dt, iouType="bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: "OrderedDict[str, Any]" = OrderedDict((k, float(v)) for k, v in zip(METRIC_NAMES, ev.stats))
    if per_category:
        prec = ev.eval["precision"]      # [T, R, K, A, M]
        per = OrderedDict()
        for k, cat_id in enumerate(ev.params.catIds):
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            per[gt.cats[cat_id].get("name", str(cat_id))] = float(p.mean()) if p.size else -1.0
        out["per_category"] = per
    return out


def format_metrics(metrics: Dict[str, float]) -> str:
    """One line: ``AP 0.512 AP50 0.701 ...``."""
    return " ".join(f"{k} {metrics[k]:.3f}" for k in METRIC_NAMES if k in metrics)
