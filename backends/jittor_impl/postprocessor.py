"""RTDETRPostProcessor: raw decoder outputs -> top-k detections in original-image pixels."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from jittor import nn

from . import framework as fw
from .box_ops import box_cxcywh_to_xyxy


class RTDETRPostProcessor(nn.Module):
    """outputs {"pred_logits" [B, Q, n_cls], "pred_boxes" [B, Q, 4] cxcywh in [0, 1]},
    orig_sizes [B, 2] (h, w) -> per image {"scores" [K], "labels" [K], "boxes" [K, 4] xyxy px}.

    With focal loss (RT-DETR) the K = num_top_queries best (query, class) pairs of the
    flattened sigmoid scores are kept.  ``label_to_category`` (optional int array [n_cls])
    maps contiguous labels to dataset category ids."""

    def __init__(self, num_classes: int = 80, use_focal_loss: bool = True, num_top_queries: int = 300,
                 label_to_category: Optional[np.ndarray] = None):
        self.num_classes = num_classes
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.label_to_category = None if label_to_category is None else np.asarray(label_to_category, dtype=np.int64)

    def execute(self, outputs, orig_sizes) -> List[Dict[str, object]]:
        logits, boxes = outputs["pred_logits"].stop_grad(), outputs["pred_boxes"].stop_grad()
        b = logits.shape[0]
        hw = orig_sizes.cast(boxes.dtype)
        wh = fw.jt.stack([hw[:, 1], hw[:, 0]], dim=-1)           # (h, w) -> (w, h)
        bbox_pred = box_cxcywh_to_xyxy(boxes) * wh.repeat(1, 2).unsqueeze(1)
        if self.use_focal_loss:
            k = min(self.num_top_queries, logits.shape[1] * logits.shape[2])
            scores, index = fw.topk(fw.sigmoid(logits).reshape(b, -1), k, dim=-1)
            labels = index % self.num_classes
            index = index // self.num_classes
            boxes = fw.gather_rows(bbox_pred, index)
        else:
            probs = fw.softmax(logits, dim=-1)[:, :, :-1]
            scores, labels = fw.max_values(probs, -1), fw.argmax(probs, -1)
            boxes = bbox_pred
            if scores.shape[1] > self.num_top_queries:
                scores, index = fw.topk(scores, self.num_top_queries, dim=-1)
                labels = fw.gather_rows(labels.unsqueeze(-1), index)[..., 0]
                boxes = fw.gather_rows(boxes, index)
        labels = fw.to_numpy(labels).astype(np.int64)
        if self.label_to_category is not None:
            labels = self.label_to_category[labels]
        return [{"scores": scores[i], "labels": labels[i], "boxes": boxes[i]} for i in range(b)]
