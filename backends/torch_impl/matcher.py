"""Hungarian matcher: cost computed here in torch, assignment by the shared numpy routine
(``rtdetr_core.matching.hungarian_match``, scipy's linear_sum_assignment)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from rtdetr_core.matching import hungarian_match

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .framework import to_numpy


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes, per image.

    cost = cost_bbox * L1 + cost_class * class cost + cost_giou * (-GIoU); with
    ``use_focal_loss`` the class cost is the focal-loss difference pos - neg.
    """

    def __init__(self, weight_dict: Mapping[str, float], use_focal_loss: bool = False,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class = weight_dict["cost_class"]
        self.cost_bbox = weight_dict["cost_bbox"]
        self.cost_giou = weight_dict["cost_giou"]
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """outputs {"pred_logits" [B, Q, n_cls], "pred_boxes" [B, Q, 4]} -> cost [B, Q, T],
        T = all targets of the batch concatenated."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1)
        out_prob = torch.sigmoid(logits) if self.use_focal_loss else logits.softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)                       # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])

        if self.use_focal_loss:
            p = out_prob[:, tgt_ids]
            neg = (1 - self.alpha) * (p ** self.gamma) * (-(1 - p + 1e-8).log())
            pos = self.alpha * ((1 - p) ** self.gamma) * (-(p + 1e-8).log())
            cost_class = pos - neg
        else:
            cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(bs, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor],
                targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """-> per image (query indices int64 [n], target indices int64 [n]), sorted by query."""
        sizes = [int(len(t["boxes"])) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in sizes]
        cost = to_numpy(self.cost_matrix(outputs, targets))
        return [(torch.from_numpy(m[0]), torch.from_numpy(m[1])) for m in hungarian_match(cost, sizes)]
