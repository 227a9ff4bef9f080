"""Hungarian matcher: the cost in the framework, the assignment by the shared
``rtdetr_core.matching.hungarian_match`` (scipy), as the official matcher.py."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from jittor import nn

from rtdetr_core.matching import hungarian_match

from . import framework as fw
from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .framework import jt


class HungarianMatcher(nn.Module):
    """weight_dict {"cost_class", "cost_bbox", "cost_giou"}; focal-style class cost."""

    def __init__(self, weight_dict: Dict[str, float], use_focal_loss: bool = False, alpha: float = 0.25,
                 gamma: float = 2.0):
        self.cost_class = weight_dict["cost_class"]
        self.cost_bbox = weight_dict["cost_bbox"]
        self.cost_giou = weight_dict["cost_giou"]
        self.use_focal_loss, self.alpha, self.gamma = use_focal_loss, alpha, gamma
        assert self.cost_class != 0 or self.cost_bbox != 0 or self.cost_giou != 0, "all costs cant be 0"

    def cost_matrix(self, outputs, targets) -> np.ndarray:
        """numpy [B, Q, T] (T = targets of the whole batch), computed without gradient."""
        logits = outputs["pred_logits"].detach()
        bs, num_queries, nc = logits.shape
        if self.use_focal_loss:
            out_prob = fw.sigmoid(logits.reshape(bs * num_queries, nc))
        else:
            out_prob = fw.softmax(logits.reshape(bs * num_queries, nc), dim=-1)
        out_bbox = outputs["pred_boxes"].detach().reshape(bs * num_queries, 4)
        tgt_ids = np.concatenate([np.asarray(t["labels"], dtype=np.int64) for t in targets])
        tgt_bbox = jt.concat([t["boxes"] for t in targets if len(t["labels"])], dim=0)
        out_prob = out_prob[:, fw.constant(tgt_ids)]                                # [BQ, T]
        if self.use_focal_loss:
            neg = (1 - self.alpha) * (out_prob ** self.gamma) * (-jt.log(1 - out_prob + fw.scalar(1e-8, out_prob)))
            pos = self.alpha * ((1 - out_prob) ** self.gamma) * (-jt.log(out_prob + fw.scalar(1e-8, out_prob)))
            cost_class = pos - neg
        else:
            cost_class = -out_prob
        cost_bbox = fw.abs_(out_bbox[:, None, :] - tgt_bbox[None, :, :]).sum(-1)    # cdist p=1
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return fw.to_numpy(c).reshape(bs, num_queries, -1)

    def execute(self, outputs, targets) -> List[np.ndarray]:
        """-> per image int64 [2, n] (query index, target index), sorted by query."""
        sizes: Sequence[int] = [len(t["labels"]) for t in targets]
        bs, q = outputs["pred_logits"].shape[:2]
        if sum(sizes) == 0:
            return [np.zeros((2, 0), dtype=np.int64) for _ in sizes]
        return hungarian_match(self.cost_matrix(outputs, targets), sizes)
