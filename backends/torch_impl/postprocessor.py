"""RTDETRPostProcessor: raw decoder outputs -> top-k detections in original-image pixels."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy
from .framework import topk


class RTDETRPostProcessor(nn.Module):
    """outputs {"pred_logits" [B, Q, n_cls], "pred_boxes" [B, Q, 4] cxcywh in [0, 1]},
    orig_sizes [B, 2] (h, w) -> per image {"scores" [K], "labels" [K], "boxes" [K, 4] xyxy px}.

    With focal loss (RT-DETR), the K = num_top_queries best (query, class) pairs of the
    flattened sigmoid scores are kept, so one query may appear with several classes.
    ``label_to_category`` (optional int array [n_cls]) maps contiguous labels to dataset
    category ids; by default labels stay contiguous 0..n_cls-1.
    """

    def __init__(self, num_classes: int = 80, use_focal_loss: bool = True, num_top_queries: int = 300,
                 label_to_category: Optional[np.ndarray] = None):
        super().__init__()
        self.num_classes = num_classes
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.label_to_category = None if label_to_category is None else np.asarray(label_to_category, dtype=np.int64)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], orig_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        # (h, w) -> scale (w, h, w, h)
        wh = orig_sizes.to(boxes.dtype).flip(-1)
        bbox_pred = box_cxcywh_to_xyxy(boxes) * wh.repeat(1, 2).unsqueeze(1)

        if self.use_focal_loss:
            k = min(self.num_top_queries, logits.shape[1] * logits.shape[2])
            scores, index = topk(torch.sigmoid(logits).flatten(1), k, dim=-1)
            labels = index % self.num_classes
            index = index // self.num_classes
            boxes = bbox_pred.gather(1, index.unsqueeze(-1).repeat(1, 1, bbox_pred.shape[-1]))
        else:
            scores, labels = F.softmax(logits, dim=-1)[:, :, :-1].max(dim=-1)
            boxes = bbox_pred
            if scores.shape[1] > self.num_top_queries:
                scores, index = topk(scores, self.num_top_queries, dim=-1)
                labels = labels.gather(1, index)
                boxes = boxes.gather(1, index.unsqueeze(-1).tile(1, 1, boxes.shape[-1]))

        if self.label_to_category is not None:
            lut = torch.from_numpy(self.label_to_category).to(labels.device)
            labels = lut[labels]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
