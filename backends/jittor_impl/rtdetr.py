"""RTDETR = PResNet backbone -> HybridEncoder -> RTDETRTransformer decoder."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from jittor import nn

from rtdetr_core.config import RTDETRConfig, load_config

from . import framework as fw
from .capture import record
from .hybrid_encoder import HybridEncoder
from .presnet import PResNet
from .rtdetr_decoder import RTDETRTransformer


def multi_scale_resize(x, size: Union[int, Sequence[int]]):
    """Nearest resize of a batch [B, 3, H, W] to [B, 3, s, s] (int) or [B, 3, h, w] (pair),
    the official multi-scale augmentation (F.interpolate's default mode, torch's index rule)."""
    hw = [int(size), int(size)] if np.isscalar(size) else [int(s) for s in size]
    return fw.interpolate_nearest(x, hw)


class RTDETR(nn.Module):
    """images [B, 3, H, W] -> decoder outputs (see RTDETRTransformer)."""

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module):
        # decoder before encoder: this is the official state_dict order
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder

    def execute(self, x, targets: Optional[List[Dict[str, object]]] = None, dn_draws=None, topk_index=None,
                multi_scale_size=None) -> Dict[str, object]:
        # the size is drawn by the caller (shared numpy RNG); None = keep the input size
        if multi_scale_size is not None:
            x = multi_scale_resize(x, multi_scale_size)
        feats = self.backbone(x)
        feats = self.encoder(feats)
        out = self.decoder(feats, targets, dn_draws=dn_draws, topk_index=topk_index)
        record("pred_logits", out["pred_logits"])
        record("pred_boxes", out["pred_boxes"])
        return out


def build_model(cfg: Union[str, RTDETRConfig]) -> RTDETR:
    """The model of a config, modules built exactly as the official YAML does (weights are
    placeholders: callers load a weights dict)."""
    cfg = load_config(cfg)
    b, e, d = cfg.backbone, cfg.encoder, cfg.decoder
    backbone = PResNet(depth=b.depth, variant=b.variant, num_stages=b.num_stages, return_idx=b.return_idx,
                       act=b.act, freeze_at=b.freeze_at, freeze_norm=b.freeze_norm)
    encoder = HybridEncoder(in_channels=e.in_channels, feat_strides=e.feat_strides, hidden_dim=e.hidden_dim,
                            nhead=e.nhead, dim_feedforward=e.dim_feedforward, dropout=e.dropout,
                            enc_act=e.enc_act, use_encoder_idx=e.use_encoder_idx,
                            num_encoder_layers=e.num_encoder_layers, pe_temperature=e.pe_temperature,
                            expansion=e.expansion, depth_mult=e.depth_mult, act=e.act,
                            eval_spatial_size=e.eval_spatial_size)
    decoder = RTDETRTransformer(num_classes=cfg.num_classes, hidden_dim=d.hidden_dim, num_queries=d.num_queries,
                                position_embed_type=d.position_embed_type, feat_channels=d.feat_channels,
                                feat_strides=d.feat_strides, num_levels=d.num_levels,
                                num_decoder_points=d.num_decoder_points, nhead=d.nhead,
                                num_decoder_layers=d.num_decoder_layers, dim_feedforward=d.dim_feedforward,
                                dropout=d.dropout, activation=d.activation, num_denoising=d.num_denoising,
                                label_noise_ratio=d.label_noise_ratio, box_noise_scale=d.box_noise_scale,
                                learnt_init_query=d.learnt_init_query, eval_spatial_size=d.eval_spatial_size,
                                eval_idx=d.eval_idx, eps=d.eps, aux_loss=d.aux_loss)
    return RTDETR(backbone, encoder, decoder)


def check_against_spec(model: RTDETR, spec, bns) -> None:
    """Jittor registers every public Var attribute silently and skips plain lists of
    modules: assert the built model is exactly the spec, trainable flags included
    (num_batches_tracked entries map to the BatchNorm2d modules ``bns``)."""
    sd = model.state_dict()
    want = [e.name for e in spec if e.dtype != "int64"]
    assert list(sd) == want, f"state_dict differs from the spec: {sorted(set(sd) ^ set(want))[:5]}"
    for e in spec:
        if e.dtype != "int64":
            assert tuple(sd[e.name].shape) == e.shape, e.name
            assert fw.is_trainable(sd[e.name]) == (e.kind == "param" and e.trainable), e.name
    assert sorted(bns) == sorted(e.name[:-len(".num_batches_tracked")] for e in spec if e.dtype == "int64")
