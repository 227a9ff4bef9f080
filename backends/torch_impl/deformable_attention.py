"""Multi-scale deformable attention (pure PyTorch, grid_sample based; no custom kernel)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def deformable_attention_core_func(value: torch.Tensor, value_spatial_shapes: Sequence[Sequence[int]],
                                   sampling_locations: torch.Tensor,
                                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of every level at the given locations, weighted sum over levels x points.

    value               [B, S, n_head, c]            S = sum(h_l * w_l), levels concatenated
    value_spatial_shapes [(h_l, w_l)] per level
    sampling_locations  [B, Lq, n_head, n_levels, n_points, 2]  (x, y) in [0, 1]
    attention_weights   [B, Lq, n_head, n_levels, n_points]      softmax over levels x points
    returns             [B, Lq, n_head * c]
    """
    bs, _, n_head, c = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in value_spatial_shapes], dim=1)
    # grid_sample wants [-1, 1]; with align_corners=False, -1/+1 are the outer pixel edges,
    # matching the anchors' (i + 0.5) / w pixel-centre convention.
    sampling_grids = 2 * sampling_locations - 1
    sampled: List[torch.Tensor] = []
    for level, (h, w) in enumerate(value_spatial_shapes):
        # [B, h*w, n_head, c] -> [B*n_head, c, h, w]
        value_l = value_list[level].flatten(2).permute(0, 2, 1).reshape(bs * n_head, c, h, w)
        # [B, Lq, n_head, P, 2] -> [B*n_head, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, level].permute(0, 2, 1, 3, 4).flatten(0, 1)
        # [B*n_head, c, Lq, P]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Lq, n_head, L, P] -> [B*n_head, 1, Lq, L*P]
    attention_weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_head, 1, len_q, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attention_weights).sum(-1).reshape(bs, n_head * c, len_q)
    return out.permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    """query [B, Lq, C], reference_points [B, Lq, 1 or n_levels, 2|4], value [B, S, C] -> [B, Lq, C].

    With 4-d references (cx, cy, w, h), offsets are scaled by half the box size / n_points;
    with 2-d references, by the level's size in pixels.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.total_points = num_heads * num_levels * num_points
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                value_spatial_shapes: Sequence[Sequence[int]], value_mask=None) -> torch.Tensor:
        bs, len_q = query.shape[:2]
        len_v = value.shape[1]
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.to(value.dtype).unsqueeze(-1)
        value = value.reshape(bs, len_v, self.num_heads, self.head_dim)

        offsets = self.sampling_offsets(query).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).reshape(bs, len_q, self.num_heads, self.num_levels * self.num_points)
        weights = F.softmax(weights, dim=-1).reshape(bs, len_q, self.num_heads, self.num_levels, self.num_points)

        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor(value_spatial_shapes, dtype=query.dtype, device=query.device)
            normalizer = normalizer.flip([1]).reshape(1, 1, 1, self.num_levels, 1, 2)   # (w, h)
            locations = reference_points.reshape(bs, len_q, 1, self.num_levels, 1, 2) + offsets / normalizer
        elif reference_points.shape[-1] == 4:
            # same operation order as the official code (bit-exact)
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")

        out = deformable_attention_core_func(value, value_spatial_shapes, locations, weights)
        return self.output_proj(out)
