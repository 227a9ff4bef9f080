"""RT-DETR post-processing in numpy (the official ``RTDETRPostProcessor``) and COCO results.

Focal-style (the RT-DETR default, ``use_focal_loss=True``)::

    scores = sigmoid(pred_logits)                    # [B, Q, C]
    top-k (k = num_top_queries) over the Q*C flattened scores, descending
    labels = index % C;  query = index // C
    boxes  = cxcywh → xyxy, times (w, h, w, h) of the original image, of those queries

Softmax style (``use_focal_loss=False``): softmax over the C classes, last column = no
object dropped, best class per query, then the top ``num_top_queries`` queries.

Ties: the official code uses ``torch.topk`` whose order among equal scores is unspecified;
here equal scores are ordered by increasing flattened index (stable sort), so the result is
deterministic.  Boxes are not clipped to the image (as the official code).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from scipy.special import expit, softmax

from .box_ops import box_cxcywh_to_xyxy


def _topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, descending, ties by lower index."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


def postprocess(pred_logits: np.ndarray, pred_boxes: np.ndarray, orig_sizes: np.ndarray, *,
                num_top_queries: int = 300, use_focal_loss: bool = True,
                label_to_category: Optional[Sequence[int]] = None) -> List[Dict[str, np.ndarray]]:
    """Detections per image: list (length B) of ``{"scores" [K], "labels" int64 [K],
    "boxes" [K, 4] xyxy in original pixels}``, K = min(num_top_queries, Q*C) (focal) or
    min(num_top_queries, Q) (softmax).

    ``orig_sizes``: [B, 2] (h, w).  ``label_to_category``: optional array [C] mapping labels
    to dataset category ids (e.g. ``dataset.label_to_category``); then ``labels`` hold
    category ids.  Computed in the dtype of ``pred_logits``/``pred_boxes`` (float32 stays
    float32, float64 stays float64).
    """
    logits = np.asarray(pred_logits)
    boxes = np.asarray(pred_boxes)
    sizes = np.asarray(orig_sizes)
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"expected pred_logits [B,Q,C] and pred_boxes [B,Q,4], got {logits.shape} and {boxes.shape}")
    b, q, c = logits.shape
    if sizes.shape != (b, 2):
        raise ValueError(f"orig_sizes must be [B, 2] (h, w) with B={b}, got shape {sizes.shape}")
    if num_top_queries < 1:
        raise ValueError(f"num_top_queries must be >= 1, got {num_top_queries}")
    fdt = np.result_type(logits.dtype, boxes.dtype, np.float32)

    h = sizes[:, 0].astype(fdt)
    w = sizes[:, 1].astype(fdt)
    scale = np.stack([w, h, w, h], axis=-1)[:, None, :]                 # [B, 1, 4]
    bbox = box_cxcywh_to_xyxy(boxes.astype(fdt)) * scale                 # [B, Q, 4]

    if use_focal_loss:
        scores = expit(logits.astype(fdt)).reshape(b, q * c)
        k = min(int(num_top_queries), q * c)
        index = _topk_desc(scores, k)                                   # [B, k]
        top_scores = np.take_along_axis(scores, index, axis=1)
        labels = (index % c).astype(np.int64)
        query = index // c
    else:
        if c < 2:
            raise ValueError("softmax post-processing needs C >= 2 (last class = no object)")
        prob = softmax(logits.astype(fdt), axis=-1)[:, :, :-1]
        best = prob.max(axis=-1)
        labels_all = prob.argmax(axis=-1).astype(np.int64)
        k = min(int(num_top_queries), q)
        if q > num_top_queries:
            query = _topk_desc(best, k)
        else:
            query = np.broadcast_to(np.arange(q), (b, q))
        top_scores = np.take_along_axis(best, query, axis=1)
        labels = np.take_along_axis(labels_all, query, axis=1)
    top_boxes = np.take_along_axis(bbox, query[..., None].repeat(4, axis=-1), axis=1)

    if label_to_category is not None:
        lut = np.asarray(label_to_category, dtype=np.int64)
        if labels.size and labels.max() >= len(lut):
            raise ValueError(f"label {int(labels.max())} has no category (label_to_category has {len(lut)} entries)")
        labels = lut[labels]
    return [{"scores": top_scores[i], "labels": labels[i], "boxes": top_boxes[i]} for i in range(b)]


class PostProcessor:
    """Configured :func:`postprocess` (``from_config(cfg)`` reads ``cfg.postprocess``)."""

    def __init__(self, num_top_queries: int = 300, use_focal_loss: bool = True,
                 label_to_category: Optional[Sequence[int]] = None):
        self.num_top_queries = int(num_top_queries)
        self.use_focal_loss = bool(use_focal_loss)
        self.label_to_category = None if label_to_category is None else np.asarray(label_to_category, dtype=np.int64)

    @classmethod
    def from_config(cls, cfg, label_to_category: Optional[Sequence[int]] = None) -> "PostProcessor":
        return cls(cfg.postprocess.num_top_queries, cfg.postprocess.use_focal_loss, label_to_category)

    def __call__(self, outputs: Dict[str, np.ndarray], orig_sizes: np.ndarray) -> List[Dict[str, np.ndarray]]:
        return postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes,
                           num_top_queries=self.num_top_queries, use_focal_loss=self.use_focal_loss,
                           label_to_category=self.label_to_category)


def to_coco_results(results: Sequence[Dict[str, np.ndarray]], image_ids: Sequence[int], *,
                    label_to_category: Optional[Sequence[int]] = None,
                    score_threshold: Optional[float] = None) -> List[Dict[str, Union[int, float, List[float]]]]:
    """COCO ``loadRes`` entries from :func:`postprocess` output.

    ``results[i]`` belongs to ``image_ids[i]``; boxes xyxy (pixels) become ``bbox`` [x, y, w, h].
    ``label_to_category``: map labels → category ids here (leave ``None`` if ``postprocess``
    already mapped them, or if labels are category ids).  Plain Python ints/floats, so the
    list is JSON-serialisable.  ``score_threshold``: drop detections scoring below it.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"{len(results)} results for {len(image_ids)} image ids")
    lut = None if label_to_category is None else np.asarray(label_to_category, dtype=np.int64)
    out: List[Dict] = []
    for res, img_id in zip(results, image_ids):
        scores = np.asarray(res["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(res["labels"], dtype=np.int64).reshape(-1)
        boxes = np.asarray(res["boxes"], dtype=np.float64).reshape(-1, 4)
        if lut is not None:
            labels = lut[labels]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        for s, lab, bb in zip(scores.tolist(), labels.tolist(), xywh.tolist()):
            if score_threshold is not None and s < score_threshold:
                continue
            out.append({"image_id": int(img_id), "category_id": int(lab), "bbox": [float(v) for v in bb],
                        "score": float(s)})
    return out
