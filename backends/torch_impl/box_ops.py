"""Differentiable box utilities on framework tensors (same formulas as the official code)."""
from __future__ import annotations

from typing import Tuple

import torch


def box_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)"""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h)"""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[N, 4] xyxy -> [N]"""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes: [N, 4], [M, 4] -> (iou [N, M], union [N, M])"""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes: [N, 4], [M, 4] -> [N, M].  Degenerate boxes (x2 < x1)
    would give inf/nan, so they are rejected."""
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()) or not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("generalized_box_iou: degenerate boxes (x2 < x1 or y2 < y1)")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area
