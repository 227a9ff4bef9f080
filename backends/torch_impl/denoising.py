"""Contrastive denoising (CDN) queries built from the four shared numpy draws.

The official function draws its noise from the torch RNG; here the draws are inputs
(``rtdetr_core.denoising.draw_denoising``, or the recorded official ones), so both
backends build identical dn queries.  Layout and arithmetic follow GOLDEN.md section 5.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from rtdetr_core.denoising import DN_DRAW_KEYS, DN_MAX_GT_KEY, dn_layout

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .common import inverse_sigmoid


def get_contrastive_denoising_training_group(targets: List[Dict[str, torch.Tensor]], num_classes: int,
                                             num_queries: int, class_embed: torch.nn.Module,
                                             draws: Optional[Mapping[str, np.ndarray]],
                                             num_denoising: int = 100, label_noise_ratio: float = 0.5,
                                             box_noise_scale: float = 1.0):
    """dn queries for a batch.

    targets: per image {"labels" int64 [n], "boxes" [n, 4] cxcywh}
    draws:   {label_mask_rand [B,N], new_label [B,N], box_sign_rand01 [B,N,4], box_rand_part [B,N,4]}
             or None (no denoising)
    Returns (dn_content [B, N, C], dn_bbox_unact [B, N, 4], attn_mask [N+Q, N+Q] bool
    (True = blocked), dn_meta) or four Nones when the batch gets no denoising.
    dn_meta = {"dn_positive_idx": list of int64 [n_b * num_group], "dn_num_group": int,
               "dn_num_split": [N, Q]}
    """
    num_gts = [int(len(t["labels"])) for t in targets]
    lay = dn_layout(num_gts, num_denoising, None if draws is None else draws.get(DN_MAX_GT_KEY))
    if lay is None or draws is None:
        return None, None, None, None
    max_gt, num_group, num_dn = lay["max_gt"], lay["num_group"], lay["num_dn"]
    bs = len(num_gts)
    device = class_embed.weight.device
    dtype = class_embed.weight.dtype
    for key in DN_DRAW_KEYS:
        want = (bs, num_dn) if key in ("label_mask_rand", "new_label") else (bs, num_dn, 4)
        if tuple(np.shape(draws[key])) != want:
            raise ValueError(f"dn draw {key!r} has shape {tuple(np.shape(draws[key]))}, expected {want}")

    # pad every image's gts to max_gt (padding: label num_classes, box 0), then tile the
    # 2*max_gt slots (positives, negatives) num_group times
    query_class = torch.full([bs, max_gt], num_classes, dtype=torch.int32, device=device)
    query_bbox = torch.zeros([bs, max_gt, 4], dtype=dtype, device=device)
    pad_gt_mask = torch.zeros([bs, max_gt], dtype=torch.bool, device=device)
    for i, n in enumerate(num_gts):
        if n > 0:
            query_class[i, :n] = targets[i]["labels"].to(torch.int32)
            query_bbox[i, :n] = targets[i]["boxes"].to(dtype)
            pad_gt_mask[i, :n] = True
    query_class = query_class.tile([1, 2 * num_group])
    query_bbox = query_bbox.tile([1, 2 * num_group, 1])
    pad_gt_mask = pad_gt_mask.tile([1, 2 * num_group])
    negative = torch.zeros([bs, max_gt * 2, 1], dtype=dtype, device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile([1, num_group, 1])                              # [B, N, 1]
    positive = (1 - negative).squeeze(-1) * pad_gt_mask                       # real positives
    dn_positive_idx = torch.nonzero(positive)[:, 1]
    dn_positive_idx = list(torch.split(dn_positive_idx, [n * num_group for n in num_gts]))

    if label_noise_ratio > 0:
        # the draws are float32; the comparison is made in float32 as the official one
        rand = torch.from_numpy(np.asarray(draws["label_mask_rand"], dtype=np.float32)).to(device)
        new_label = torch.from_numpy(np.asarray(draws["new_label"])).to(device=device, dtype=torch.int32)
        mask = rand < (label_noise_ratio * 0.5)
        query_class = torch.where(mask & pad_gt_mask, new_label, query_class)

    if box_noise_scale > 0:
        sign01 = torch.from_numpy(np.asarray(draws["box_sign_rand01"])).to(device=device, dtype=dtype)
        rand_part = torch.from_numpy(np.asarray(draws["box_rand_part"])).to(device=device, dtype=dtype)
        known_bbox = box_cxcywh_to_xyxy(query_bbox)
        diff = torch.tile(query_bbox[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        rand_sign = sign01 * 2.0 - 1.0
        # negatives are pushed further: |shift| in [1, 2) half-sizes instead of [0, 1)
        rand_part = (rand_part + 1.0) * negative + rand_part * (1 - negative)
        rand_part = rand_part * rand_sign
        known_bbox = (known_bbox + rand_part * diff).clip(min=0.0, max=1.0)
        query_bbox = inverse_sigmoid(box_xyxy_to_cxcywh(known_bbox))

    # padding slots look up row num_classes (not zero: padding_idx only affects init/grad)
    dn_content = class_embed(query_class)

    # attention mask: matching queries never see dn queries; dn groups never see each other
    tgt_size = num_dn + num_queries
    group = torch.arange(num_dn, device=device) // (2 * max_gt)
    attn_mask = torch.zeros([tgt_size, tgt_size], dtype=torch.bool, device=device)
    attn_mask[num_dn:, :num_dn] = True
    attn_mask[:num_dn, :num_dn] = group[:, None] != group[None, :]

    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
               "dn_num_split": [num_dn, num_queries]}
    return dn_content, query_bbox, attn_mask, dn_meta
