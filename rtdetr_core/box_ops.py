"""Box conversions, IoU and GIoU in numpy (float64 friendly)."""
from __future__ import annotations

import numpy as np


def box_cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h)."""
    x1, y1, x2, y2 = np.moveaxis(b, -1, 0)
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def box_xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
    x, y, w, h = np.moveaxis(b, -1, 0)
    return np.stack([x, y, x + w, y + h], axis=-1)


def box_xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = np.moveaxis(b, -1, 0)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)


def box_area(b: np.ndarray) -> np.ndarray:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: np.ndarray, b: np.ndarray):
    """Pairwise IoU of xyxy boxes: a [N,4], b [M,4] -> (iou [N,M], union [N,M])."""
    area_a, area_b = box_area(a), box_area(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise GIoU of xyxy boxes: a [N,4], b [M,4] -> [N,M]."""
    iou, union = box_iou(a, b)
    lt = np.minimum(a[:, None, :2], b[None, :, :2])
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area
