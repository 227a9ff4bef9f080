"""Contrastive denoising (CDN) group, official denoising.py with the random draws supplied.

The four draws come from ``rtdetr_core.denoising.draw_denoising`` (numpy), so both
backends build the same dn queries.  Everything here except the class-embedding lookup is
a constant of the batch, so it is computed in numpy, in the model dtype, step by step as
the official float32 code does (GOLDEN.md section 5)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import numpy as np

from rtdetr_core.denoising import DN_DRAW_KEYS, DN_MAX_GT_KEY, dn_layout

from . import framework as fw


def _inverse_sigmoid_np(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    f = x.dtype.type
    x = np.clip(x, f(0), f(1))
    return np.log(np.maximum(x, f(eps)) / np.maximum(f(1) - x, f(eps)))


def get_contrastive_denoising_training_group(targets, num_classes, num_queries, class_embed,
                                             draws: Optional[Mapping[str, np.ndarray]],
                                             num_denoising=100, label_noise_ratio=0.5,
                                             box_noise_scale=1.0, dtype: str = "float32"):
    """targets: list of {"labels" int [n], "boxes" [n, 4] cxcywh} (numpy);
    draws: dict of the four arrays [B, N_dn(, 4)] or None.

    Returns (input_query_class [B, N_dn, C] Var, input_query_bbox_unact [B, N_dn, 4] Var,
    attn_mask [N_dn + Q, N_dn + Q] bool Var (True = blocked), dn_meta) or four Nones."""
    if num_denoising <= 0 or draws is None:
        return None, None, None, None
    num_gts = [len(t["labels"]) for t in targets]
    lay = dn_layout(num_gts, num_denoising, None if draws is None else draws.get(DN_MAX_GT_KEY))
    if lay is None:
        return None, None, None, None
    g, num_group, n_dn = lay["max_gt"], lay["num_group"], lay["num_dn"]
    bs = len(num_gts)
    for k in DN_DRAW_KEYS:
        want = (bs, n_dn, 4) if k.startswith("box") else (bs, n_dn)
        if tuple(np.shape(draws[k])) != want:
            raise ValueError(f"dn draw {k!r} has shape {np.shape(draws[k])}, expected {want}")
    f = np.dtype(dtype).type

    # pad gts to G per image, then tile 2 * num_group times (positives then negatives)
    query_class = np.full((bs, g), num_classes, dtype=np.int64)
    query_bbox = np.zeros((bs, g, 4), dtype=dtype)
    pad_gt_mask = np.zeros((bs, g), dtype=bool)
    for i, n in enumerate(num_gts):
        if n > 0:
            query_class[i, :n] = fw.to_numpy(targets[i]["labels"])
            query_bbox[i, :n] = fw.to_numpy(targets[i]["boxes"]).astype(dtype)
            pad_gt_mask[i, :n] = True
    query_class = np.tile(query_class, (1, 2 * num_group))
    query_bbox = np.tile(query_bbox, (1, 2 * num_group, 1))
    pad_gt_mask = np.tile(pad_gt_mask, (1, 2 * num_group))
    negative = np.zeros((bs, 2 * g, 1), dtype=dtype)
    negative[:, g:] = 1
    negative = np.tile(negative, (1, num_group, 1))                           # [B, N_dn, 1]
    positive = (f(1) - negative)[..., 0] * pad_gt_mask
    dn_positive_idx: List[np.ndarray] = [np.nonzero(positive[i])[0].astype(np.int64) for i in range(bs)]

    if label_noise_ratio > 0:
        mask = np.asarray(draws["label_mask_rand"], dtype=np.float32) < (label_noise_ratio * 0.5)
        new_label = np.asarray(draws["new_label"]).astype(np.int64)
        query_class = np.where(mask & pad_gt_mask, new_label, query_class)

    if box_noise_scale > 0:
        cx, cy, w, h = np.moveaxis(query_bbox, -1, 0)
        half = f(0.5)
        known = np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], -1)
        diff = np.tile(query_bbox[..., 2:] * half, (1, 1, 2)) * f(box_noise_scale)
        rand_sign = np.asarray(draws["box_sign_rand01"], dtype=dtype) * f(2.0) - f(1.0)
        rand_part = np.asarray(draws["box_rand_part"], dtype=dtype)
        rand_part = (rand_part + f(1.0)) * negative + rand_part * (f(1) - negative)
        rand_part = rand_part * rand_sign
        known = np.clip(known + rand_part * diff, f(0.0), f(1.0))
        x0, y0, x1, y1 = np.moveaxis(known, -1, 0)
        query_bbox = np.stack([(x0 + x1) / f(2), (y0 + y1) / f(2), x1 - x0, y1 - y0], -1)
        query_bbox = _inverse_sigmoid_np(query_bbox.astype(dtype))

    input_query_class = class_embed(fw.constant(query_class))                  # [B, N_dn, C]

    tgt_size = n_dn + num_queries
    attn_mask = np.zeros((tgt_size, tgt_size), dtype=bool)
    attn_mask[n_dn:, :n_dn] = True                 # matching queries cannot see dn queries
    for i in range(num_group):                     # dn groups cannot see each other
        rows = slice(2 * g * i, 2 * g * (i + 1))
        if i == 0:
            attn_mask[rows, 2 * g * (i + 1):n_dn] = True
        if i == num_group - 1:
            attn_mask[rows, :2 * g * i] = True
        else:
            attn_mask[rows, 2 * g * (i + 1):n_dn] = True
            attn_mask[rows, :2 * g * i] = True
    dn_meta: Dict[str, object] = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
                                  "dn_num_split": [n_dn, num_queries]}
    return (input_query_class, fw.constant(query_bbox.astype(dtype)), fw.constant(attn_mask), dn_meta)
