"""Box conversions and (G)IoU on framework tensors, differentiable (official box_ops.py)."""
from __future__ import annotations

from . import framework as fw
from .framework import jt


def box_cxcywh_to_xyxy(x):
    """[..., 4] (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    x_c, y_c, w, h = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
    return jt.stack([x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x):
    x0, y0, x1, y1 = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
    return jt.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def box_iou(boxes1, boxes2):
    """boxes1 [N, 4], boxes2 [M, 4] xyxy -> (iou [N, M], union [N, M])."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = fw.maximum(boxes1[:, None, :2], boxes2[None, :, :2])      # torch tie-gradient semantics
    rb = fw.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = fw.clamp(rb - lt, min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise GIoU of xyxy boxes [N, 4] x [M, 4] -> [N, M] (degenerate boxes are not
    checked here: that would force a sync)."""
    iou, union = box_iou(boxes1, boxes2)
    lt = fw.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = fw.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = fw.clamp(rb - lt, min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area
