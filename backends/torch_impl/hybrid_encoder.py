"""HybridEncoder: AIFI (one transformer encoder on the S5 map) + CCFM (FPN/PAN fusion)."""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiheadAttention
from .capture import record
from .common import ConvNormLayer, get_activation
from .normalization import BatchNorm2d, LayerNorm


class RepVggBlock(nn.Module):
    """act(conv3x3-BN(x) + conv1x1-BN(x)).  x [B, C, H, W] -> [B, C, H, W]"""

    def __init__(self, ch_in: int, ch_out: int, act="relu"):
        super().__init__()
        self.ch_in, self.ch_out = ch_in, ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """conv3(bottlenecks(conv1(x)) + conv2(x)); conv3 is the identity when the hidden width
    (out_channels * expansion) already equals out_channels.

    x [B, C_in, H, W] -> [B, C_out, H, W]
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3,
                 expansion: float = 1.0, bias=None, act="silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        if hidden != out_channels:
            self.conv3 = ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
        else:
            self.conv3 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer; the position embedding is added to queries and keys only.

    src [B, N, C], pos_embed [1, N, C] -> [B, N, C]
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", normalize_before: bool = False):
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(self, src: torch.Tensor, src_mask=None, pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = src if pos_embed is None else src + pos_embed
        src, _ = self.self_attn(q, k, value=src, attn_mask=src_mask, need_weights=False)
        src = residual + self.dropout1(src)
        if not self.normalize_before:
            src = self.norm1(src)

        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = self.linear2(self.dropout(self.activation(self.linear1(src))))
        src = residual + self.dropout2(src)
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of one layer.  src [B, N, C] -> [B, N, C]"""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm=None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: torch.Tensor, src_mask=None, pos_embed=None) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=src_mask, pos_embed=pos_embed)
        if self.norm is not None:
            out = self.norm(out)
        return out


class HybridEncoder(nn.Module):
    """feats (list of [B, C_i, h_i, w_i]) -> list of [B, hidden_dim, h_i, w_i].

    The AIFI position embedding is always built for the actual map size (at the official
    eval size this equals the official precomputed buffer), in the input's dtype.
    """

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), feat_strides: Sequence[int] = (8, 16, 32),
                 hidden_dim: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 enc_act="gelu", use_encoder_idx: Sequence[int] = (2,), num_encoder_layers: int = 1,
                 pe_temperature: float = 10000.0, expansion: float = 1.0, depth_mult: float = 1.0,
                 act="silu", eval_spatial_size=None):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = eval_spatial_size   # kept for fidelity; never used (see class doc)
        self.out_channels = [hidden_dim] * len(self.in_channels)
        self.out_strides = self.feat_strides

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False), BatchNorm2d(hidden_dim))
            for c in self.in_channels)

        layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                                        dropout=dropout, activation=enc_act)
        self.encoder = nn.ModuleList(
            TransformerEncoder(copy.deepcopy(layer), num_encoder_layers) for _ in self.use_encoder_idx)

        n = len(self.in_channels)
        nb = round(3 * depth_mult)
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act) for _ in range(n - 1))
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(hidden_dim * 2, hidden_dim, nb, act=act, expansion=expansion) for _ in range(n - 1))
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act) for _ in range(n - 1))
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(hidden_dim * 2, hidden_dim, nb, act=act, expansion=expansion) for _ in range(n - 1))

    @staticmethod
    def build_2d_sincos_position_embedding(w: int, h: int, embed_dim: int = 256, temperature: float = 10000.0,
                                           dtype=torch.float32, device="cpu") -> torch.Tensor:
        """[1, w*h, embed_dim] sin-cos embedding, bit-exact with the official one.

        Official quirk kept on purpose: the grid is meshgrid(arange(w), arange(h), 'ij'),
        so token k gets a = k // h in the first half and b = k % h in the second half.
        Tokens are flattened row-major (k = y*w + x), so for square maps a = y, b = x, and
        for non-square maps the embedding is scrambled exactly as in the official model.
        """
        if embed_dim % 4:
            raise ValueError("embed_dim must be divisible by 4 for the 2D sin-cos position embedding")
        grid_w = torch.arange(int(w), dtype=dtype, device=device)
        grid_h = torch.arange(int(h), dtype=dtype, device=device)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
        pos_dim = embed_dim // 4
        omega = torch.arange(pos_dim, dtype=dtype, device=device) / pos_dim
        omega = 1.0 / (temperature ** omega)
        out_w = grid_w.flatten()[..., None] @ omega[None]      # [w*h, pos_dim]
        out_h = grid_h.flatten()[..., None] @ omega[None]
        return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None, :, :]

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = []
        for i, feat in enumerate(feats):
            proj.append(self.input_proj[i](feat))
            record(f"encoder.input_proj.{i}", proj[-1])

        # AIFI: intra-scale self-attention on the selected (S5) map(s)
        if self.num_encoder_layers > 0:
            for i, lvl in enumerate(self.use_encoder_idx):
                h, w = proj[lvl].shape[2:]
                src = proj[lvl].flatten(2).permute(0, 2, 1)          # [B, h*w, C], row-major tokens
                pos = self.build_2d_sincos_position_embedding(
                    w, h, self.hidden_dim, self.pe_temperature, dtype=src.dtype, device=src.device)
                record(f"encoder.encoder.{i}.pos_embed", pos)
                memory = self.encoder[i](src, pos_embed=pos)
                record(f"encoder.encoder.{i}", memory)
                proj[lvl] = memory.permute(0, 2, 1).reshape(-1, self.hidden_dim, h, w).contiguous()

        # CCFM top-down (FPN): inner_outs[0] is always the coarsest map processed so far
        n = len(self.in_channels)
        inner_outs = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            k = n - 1 - idx
            feat_high = self.lateral_convs[k](inner_outs[0])
            record(f"encoder.lateral_convs.{k}", feat_high)
            inner_outs[0] = feat_high
            up = F.interpolate(feat_high, scale_factor=2.0, mode="nearest")
            inner = self.fpn_blocks[k](torch.cat([up, proj[idx - 1]], dim=1))
            record(f"encoder.fpn_blocks.{k}", inner)
            inner_outs.insert(0, inner)

        # CCFM bottom-up (PAN)
        outs = [inner_outs[0]]
        for idx in range(n - 1):
            down = self.downsample_convs[idx](outs[-1])
            record(f"encoder.downsample_convs.{idx}", down)
            out = self.pan_blocks[idx](torch.cat([down, inner_outs[idx + 1]], dim=1))
            record(f"encoder.pan_blocks.{idx}", out)
            outs.append(out)
        for i, o in enumerate(outs):
            record(f"encoder.outputs.{i}", o)
        return outs
