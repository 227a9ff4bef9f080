"""HybridEncoder: AIFI (one transformer layer on S5) + CCFM (top-down FPN, bottom-up PAN)."""
from __future__ import annotations

import copy

import numpy as np
from jittor import nn

from . import framework as fw
from .attention import MultiheadAttention
from .capture import record
from .common import ConvNormLayer, Dropout, get_activation
from .conv import Conv2d
from .framework import jt
from .normalization import BatchNorm2d, LayerNorm


class RepVggBlock(nn.Module):
    """act(conv3x3-BN(x) + conv1x1-BN(x)) (training form; no deploy fusion)."""

    def __init__(self, ch_in, ch_out, act="relu"):
        self.ch_in, self.ch_out = ch_in, ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)

    def execute(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """conv3(bottlenecks(conv1(x)) + conv2(x)); conv3 is the identity when hidden == out."""

    def __init__(self, in_channels, out_channels, num_blocks=3, expansion=1.0, bias=None, act="silu"):
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = (ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
                      if hidden != out_channels else get_activation(None))

    def execute(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention (pos added to q, k) then FFN."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        self.normalize_before = normalize_before
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = get_activation(activation)

    @staticmethod
    def with_pos_embed(tensor, pos_embed):
        return tensor if pos_embed is None else tensor + pos_embed

    def execute(self, src, src_mask=None, pos_embed=None):
        # src [B, N, C], pos_embed [1, N, C]
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = self.with_pos_embed(src, pos_embed)
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
    def __init__(self, encoder_layer, num_layers, norm=None):
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def execute(self, src, src_mask=None, pos_embed=None):
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=src_mask, pos_embed=pos_embed)
        if self.norm is not None:
            output = self.norm(output)
        return output


class HybridEncoder(nn.Module):
    """feats (C3, C4, C5) [B, C_i, h_i, w_i] -> three maps [B, hidden_dim, h_i, w_i].

    The AIFI position embedding is always built for the actual map size (equal to the
    official precomputed one when the input has eval_spatial_size)."""

    def __init__(self, in_channels=(512, 1024, 2048), feat_strides=(8, 16, 32), hidden_dim=256,
                 nhead=8, dim_feedforward=1024, dropout=0.0, enc_act="gelu", use_encoder_idx=(2,),
                 num_encoder_layers=1, pe_temperature=10000, expansion=1.0, depth_mult=1.0,
                 act="silu", eval_spatial_size=None):
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = eval_spatial_size
        self.out_channels = [hidden_dim for _ in self.in_channels]
        self.out_strides = self.feat_strides
        self.input_proj = nn.ModuleList([
            nn.Sequential(Conv2d(c, hidden_dim, 1, bias=False), BatchNorm2d(hidden_dim))
            for c in self.in_channels])
        layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                                        dropout=dropout, activation=enc_act)
        self.encoder = nn.ModuleList([TransformerEncoder(copy.deepcopy(layer), num_encoder_layers)
                                      for _ in self.use_encoder_idx])
        n = len(self.in_channels)
        nb = round(3 * depth_mult)
        self.lateral_convs = nn.ModuleList([ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act)
                                            for _ in range(n - 1)])
        self.fpn_blocks = nn.ModuleList([CSPRepLayer(hidden_dim * 2, hidden_dim, nb, act=act, expansion=expansion)
                                         for _ in range(n - 1)])
        self.downsample_convs = nn.ModuleList([ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act)
                                               for _ in range(n - 1)])
        self.pan_blocks = nn.ModuleList([CSPRepLayer(hidden_dim * 2, hidden_dim, nb, act=act, expansion=expansion)
                                         for _ in range(n - 1)])

    @staticmethod
    def build_2d_sincos_position_embedding(w, h, embed_dim=256, temperature=10000.0, dtype="float32"):
        """numpy [1, w*h, embed_dim], the official formula and its token order: meshgrid(w, h,
        'ij') flattened, so token k gets a = k // h, b = k % h (on non-square maps this is
        not (row, col) of the row-major tokens; replicated on purpose).  Computed in the
        model dtype, step by step like the official float32 code."""
        assert embed_dim % 4 == 0, "embed dim must be divisible by 4 for 2D sin-cos embedding"
        f = np.dtype(dtype).type
        grid_w, grid_h = np.meshgrid(np.arange(int(w), dtype=dtype), np.arange(int(h), dtype=dtype), indexing="ij")
        pos_dim = embed_dim // 4
        omega = np.arange(pos_dim, dtype=dtype) / f(pos_dim)
        omega = f(1.0) / (f(temperature) ** omega)
        out_w = grid_w.reshape(-1)[:, None] * omega[None]
        out_h = grid_h.reshape(-1)[:, None] * omega[None]
        pe = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
        return pe[None].astype(dtype)

    def execute(self, feats):
        assert len(feats) == len(self.in_channels)
        proj_feats = []
        for i, feat in enumerate(feats):
            proj_feats.append(self.input_proj[i](feat))
            record(f"encoder.input_proj.{i}", proj_feats[-1])
        if self.num_encoder_layers > 0:
            for i, enc_ind in enumerate(self.use_encoder_idx):
                b, c, h, w = proj_feats[enc_ind].shape
                src_flatten = proj_feats[enc_ind].reshape(b, c, h * w).permute(0, 2, 1)   # [B, hw, C]
                pe = self.build_2d_sincos_position_embedding(w, h, self.hidden_dim, self.pe_temperature,
                                                             dtype=str(src_flatten.dtype))
                pos_embed = fw.constant(pe)
                record(f"encoder.encoder.{i}.pos_embed", pos_embed)
                memory = self.encoder[i](src_flatten, pos_embed=pos_embed)
                record(f"encoder.encoder.{i}", memory)
                proj_feats[enc_ind] = memory.permute(0, 2, 1).reshape(b, self.hidden_dim, h, w)

        n = len(self.in_channels)
        inner_outs = [proj_feats[-1]]
        for idx in range(n - 1, 0, -1):
            feat_high, feat_low = inner_outs[0], proj_feats[idx - 1]
            j = n - 1 - idx
            feat_high = self.lateral_convs[j](feat_high)
            record(f"encoder.lateral_convs.{j}", feat_high)
            inner_outs[0] = feat_high
            upsample_feat = fw.interpolate_nearest(feat_high, (feat_high.shape[2] * 2, feat_high.shape[3] * 2))
            inner_out = self.fpn_blocks[j](jt.concat([upsample_feat, feat_low], dim=1))
            record(f"encoder.fpn_blocks.{j}", inner_out)
            inner_outs.insert(0, inner_out)

        outs = [inner_outs[0]]
        for idx in range(n - 1):
            feat_low, feat_high = outs[-1], inner_outs[idx + 1]
            downsample_feat = self.downsample_convs[idx](feat_low)
            record(f"encoder.downsample_convs.{idx}", downsample_feat)
            out = self.pan_blocks[idx](jt.concat([downsample_feat, feat_high], dim=1))
            record(f"encoder.pan_blocks.{idx}", out)
            outs.append(out)
        for i, o in enumerate(outs):
            record(f"encoder.outputs.{i}", o)
        return outs
