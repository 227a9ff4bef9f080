"""Multi-scale deformable attention (official rtdetr_decoder.py / utils.py, pure framework ops)."""
from __future__ import annotations

from jittor import nn

from . import framework as fw
from .framework import jt


def deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Bilinear sampling of every level at the sampling locations, weighted sum.

    value               [B, S, n_head, c]             S = sum of h*w over levels
    value_spatial_shapes [(h, w)] per level
    sampling_locations  [B, Lq, n_head, n_levels, n_points, 2]   (x, y) in [0, 1]
    attention_weights   [B, Lq, n_head, n_levels, n_points]
    returns             [B, Lq, n_head * c]
    """
    bs, _, n_head, c = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    sampling_grids = 2 * sampling_locations - 1          # grid_sample's [-1, 1] convention
    sampling_value_list = []
    start = 0
    for level, (h, w) in enumerate(value_spatial_shapes):
        # [B, hw, M, c] -> [B, M*c, hw] -> [B*M, c, h, w]
        value_l = value[:, start:start + h * w].reshape(bs, h * w, n_head * c).permute(0, 2, 1)
        value_l = value_l.reshape(bs * n_head, c, h, w)
        start += h * w
        # [B, Lq, M, P, 2] -> [B, M, Lq, P, 2] -> [B*M, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(bs * n_head, len_q, n_points, 2)
        sampling_value_list.append(fw.grid_sample(value_l, grid_l))          # [B*M, c, Lq, P]
    # [B, Lq, M, L, P] -> [B, M, Lq, L, P] -> [B*M, 1, Lq, L*P]
    attention_weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_head, 1, len_q, n_levels * n_points)
    stacked = jt.stack(sampling_value_list, dim=-2).reshape(bs * n_head, c, len_q, n_levels * n_points)
    output = (stacked * attention_weights).sum(-1).reshape(bs, n_head * c, len_q)
    return output.permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points=4):
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.total_points = num_heads * num_levels * num_points
        self.head_dim = embed_dim // num_heads
        assert self.head_dim * num_heads == embed_dim, "embed_dim must be divisible by num_heads"
        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.ms_deformable_attn_core = deformable_attention_core_func

    def execute(self, query, reference_points, value, value_spatial_shapes, value_mask=None):
        """query [B, Lq, C]; reference_points [B, Lq, n_levels or 1, 2 or 4] in [0, 1];
        value [B, S, C]; value_mask [B, S] (True = keep) -> [B, Lq, C]."""
        bs, len_q = query.shape[:2]
        len_v = value.shape[1]
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.cast(value.dtype).unsqueeze(-1)
        value = value.reshape(bs, len_v, self.num_heads, self.head_dim)
        sampling_offsets = self.sampling_offsets(query).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points, 2)
        attention_weights = self.attention_weights(query).reshape(
            bs, len_q, self.num_heads, self.num_levels * self.num_points)
        attention_weights = fw.softmax(attention_weights, dim=-1).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (w, h)
            normalizer = fw.constant([[w, h] for h, w in value_spatial_shapes], str(query.dtype))
            sampling_locations = (reference_points.reshape(bs, len_q, 1, self.num_levels, 1, 2)
                                  + sampling_offsets / normalizer.reshape(1, 1, 1, self.num_levels, 1, 2))
        elif reference_points.shape[-1] == 4:
            # offsets scaled by half the reference box size, over num_points
            ref = reference_points.unsqueeze(2).unsqueeze(4)          # [B, Lq, 1, L', 1, 4]
            sampling_locations = ref[..., :2] + sampling_offsets / self.num_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
        output = self.ms_deformable_attn_core(value, value_spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)
