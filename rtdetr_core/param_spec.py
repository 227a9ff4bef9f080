"""The canonical parameter spec: every state_dict entry of an RT-DETR model, in order.

This is the contract both backends meet (names, shapes, dtypes, order) and it equals the
official RT-DETR v1 ``state_dict()`` key for key (``num_batches_tracked`` included).  It is
built by walking the same module tree the official code builds, in registration order:
for each module its parameters, then its buffers, then its children.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from .config import RTDETRConfig, load_config

RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: Tuple[int, ...]
    dtype: str            # "float32" or "int64"
    kind: str             # "param" (nn.Parameter) or "buffer"
    trainable: bool       # params only; False for frozen params and every buffer

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class _Spec:
    def __init__(self) -> None:
        self.entries: List[ParamEntry] = []

    def param(self, name: str, shape, trainable: bool = True) -> None:
        self.entries.append(ParamEntry(name, tuple(int(s) for s in shape), "float32", "param", trainable))

    def buffer(self, name: str, shape, dtype: str = "float32") -> None:
        self.entries.append(ParamEntry(name, tuple(int(s) for s in shape), dtype, "buffer", False))

    # --- leaf modules (torch registration order) -------------------------------------
    def conv(self, p, cin, cout, k, bias=False, trainable=True):
        self.param(f"{p}.weight", (cout, cin, k, k), trainable)
        if bias:
            self.param(f"{p}.bias", (cout,), trainable)

    def bn(self, p, c, frozen=False, trainable=True):
        if frozen:  # FrozenBatchNorm2d: four buffers, no num_batches_tracked
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                self.buffer(f"{p}.{leaf}", (c,))
        else:
            self.param(f"{p}.weight", (c,), trainable)
            self.param(f"{p}.bias", (c,), trainable)
            self.buffer(f"{p}.running_mean", (c,))
            self.buffer(f"{p}.running_var", (c,))
            self.buffer(f"{p}.num_batches_tracked", (), "int64")

    def linear(self, p, cin, cout):
        self.param(f"{p}.weight", (cout, cin))
        self.param(f"{p}.bias", (cout,))

    def layernorm(self, p, c):
        self.param(f"{p}.weight", (c,))
        self.param(f"{p}.bias", (c,))

    def mha(self, p, d):
        self.param(f"{p}.in_proj_weight", (3 * d, d))
        self.param(f"{p}.in_proj_bias", (3 * d,))
        self.linear(f"{p}.out_proj", d, d)

    def conv_norm(self, p, cin, cout, k, frozen_bn=False, trainable=True):
        self.conv(f"{p}.conv", cin, cout, k, trainable=trainable)
        self.bn(f"{p}.norm", cout, frozen=frozen_bn, trainable=trainable)

    def mlp(self, p, din, dh, dout, n):
        dims = [din] + [dh] * (n - 1) + [dout]
        for i in range(n):
            self.linear(f"{p}.layers.{i}", dims[i], dims[i + 1])


def _backbone(s: _Spec, cfg: RTDETRConfig) -> None:
    b = cfg.backbone
    fz = b.freeze_norm
    frozen_stages = -1 if b.freeze_at < 0 else b.freeze_at   # stem frozen when freeze_at >= 0
    stem_train = b.freeze_at < 0
    ch = 64
    if b.variant in ("c", "d"):
        stem = [(3, ch // 2, 3, "conv1_1"), (ch // 2, ch // 2, 3, "conv1_2"), (ch // 2, ch, 3, "conv1_3")]
    else:
        stem = [(3, ch, 7, "conv1_1")]
    for cin, cout, k, name in stem:
        s.conv_norm(f"backbone.conv1.{name}", cin, cout, k, frozen_bn=fz, trainable=stem_train)
    bottleneck = b.depth >= 50
    exp = 4 if bottleneck else 1
    cin = ch
    for i in range(b.num_stages):
        cout = [64, 128, 256, 512][i]
        train_stage = not (0 <= i < frozen_stages)
        for j in range(RESNET_BLOCKS[b.depth][i]):
            p = f"backbone.res_layers.{i}.blocks.{j}"
            stride = 2 if (j == 0 and i != 0) else 1
            shortcut = j != 0
            if bottleneck:
                s.conv_norm(f"{p}.branch2a", cin, cout, 1, fz, train_stage)
                s.conv_norm(f"{p}.branch2b", cout, cout, 3, fz, train_stage)
                s.conv_norm(f"{p}.branch2c", cout, cout * exp, 1, fz, train_stage)
                if not shortcut:
                    short = f"{p}.short.conv" if (b.variant == "d" and stride == 2) else f"{p}.short"
                    s.conv_norm(short, cin, cout * exp, 1, fz, train_stage)
            else:
                # BasicBlock registers `short` before its branches (official quirk: stage 0
                # block 0 has a 1x1 projection although channels match).
                if not shortcut:
                    short = f"{p}.short.conv" if (b.variant == "d" and stride == 2) else f"{p}.short"
                    s.conv_norm(short, cin, cout, 1, fz, train_stage)
                s.conv_norm(f"{p}.branch2a", cin, cout, 3, fz, train_stage)
                s.conv_norm(f"{p}.branch2b", cout, cout, 3, fz, train_stage)
            if j == 0:
                cin = cout * exp


def _decoder(s: _Spec, cfg: RTDETRConfig) -> None:
    d, nc = cfg.decoder, cfg.num_classes
    h = d.hidden_dim
    for i, c in enumerate(d.feat_channels):
        s.conv(f"decoder.input_proj.{i}.conv", c, h, 1)
        s.bn(f"decoder.input_proj.{i}.norm", h)
    cin = d.feat_channels[-1]
    for i in range(len(d.feat_channels), d.num_levels):
        s.conv(f"decoder.input_proj.{i}.conv", cin, h, 3)
        s.bn(f"decoder.input_proj.{i}.norm", h)
        cin = h
    tp = d.nhead * d.num_levels * d.num_decoder_points
    for i in range(d.num_decoder_layers):
        p = f"decoder.decoder.layers.{i}"
        s.mha(f"{p}.self_attn", h)
        s.layernorm(f"{p}.norm1", h)
        s.linear(f"{p}.cross_attn.sampling_offsets", h, tp * 2)
        s.linear(f"{p}.cross_attn.attention_weights", h, tp)
        s.linear(f"{p}.cross_attn.value_proj", h, h)
        s.linear(f"{p}.cross_attn.output_proj", h, h)
        s.layernorm(f"{p}.norm2", h)
        s.linear(f"{p}.linear1", h, d.dim_feedforward)
        s.linear(f"{p}.linear2", d.dim_feedforward, h)
        s.layernorm(f"{p}.norm3", h)
    if d.num_denoising > 0:
        s.param("decoder.denoising_class_embed.weight", (nc + 1, h))
    if d.learnt_init_query:
        s.param("decoder.tgt_embed.weight", (d.num_queries, h))
    s.mlp("decoder.query_pos_head", 4, 2 * h, h, 2)
    s.linear("decoder.enc_output.0", h, h)
    s.layernorm("decoder.enc_output.1", h)
    s.linear("decoder.enc_score_head", h, nc)
    s.mlp("decoder.enc_bbox_head", h, h, 4, 3)
    for i in range(d.num_decoder_layers):
        s.linear(f"decoder.dec_score_head.{i}", h, nc)
    for i in range(d.num_decoder_layers):
        s.mlp(f"decoder.dec_bbox_head.{i}", h, h, 4, 3)


def _csp(s: _Spec, p: str, cin: int, cout: int, nblocks: int, expansion: float) -> None:
    hid = int(cout * expansion)
    s.conv_norm(f"{p}.conv1", cin, hid, 1)
    s.conv_norm(f"{p}.conv2", cin, hid, 1)
    for k in range(nblocks):
        s.conv_norm(f"{p}.bottlenecks.{k}.conv1", hid, hid, 3)
        s.conv_norm(f"{p}.bottlenecks.{k}.conv2", hid, hid, 1)
    if hid != cout:
        s.conv_norm(f"{p}.conv3", hid, cout, 1)


def _encoder(s: _Spec, cfg: RTDETRConfig) -> None:
    e = cfg.encoder
    h = e.hidden_dim
    for i, c in enumerate(e.in_channels):
        s.conv(f"encoder.input_proj.{i}.0", c, h, 1)
        s.bn(f"encoder.input_proj.{i}.1", h)
    for i in range(len(e.use_encoder_idx)):
        for j in range(e.num_encoder_layers):
            p = f"encoder.encoder.{i}.layers.{j}"
            s.mha(f"{p}.self_attn", h)
            s.linear(f"{p}.linear1", h, e.dim_feedforward)
            s.linear(f"{p}.linear2", e.dim_feedforward, h)
            s.layernorm(f"{p}.norm1", h)
            s.layernorm(f"{p}.norm2", h)
    nb = round(3 * e.depth_mult)
    n = len(e.in_channels)
    for i in range(n - 1):
        s.conv_norm(f"encoder.lateral_convs.{i}", h, h, 1)
    for i in range(n - 1):
        _csp(s, f"encoder.fpn_blocks.{i}", 2 * h, h, nb, e.expansion)
    for i in range(n - 1):
        s.conv_norm(f"encoder.downsample_convs.{i}", h, h, 3)
    for i in range(n - 1):
        _csp(s, f"encoder.pan_blocks.{i}", 2 * h, h, nb, e.expansion)


def param_spec(cfg) -> List[ParamEntry]:
    """Ordered state_dict entries of the model built from ``cfg`` (preset name, path or config).

    Order matches the official ``RTDETR``: ``backbone``, ``decoder``, ``encoder`` (the
    official ``__init__`` assigns the decoder before the encoder)."""
    cfg = load_config(cfg)
    s = _Spec()
    _backbone(s, cfg)
    _decoder(s, cfg)
    _encoder(s, cfg)
    return s.entries


def spec_dict(cfg) -> Dict[str, ParamEntry]:
    return {e.name: e for e in param_spec(cfg)}


def spec_totals(entries: List[ParamEntry]) -> Dict[str, int]:
    params = [e for e in entries if e.kind == "param"]
    out = {
        "num_state_dict_keys": len(entries),
        "num_param_tensors": len(params),
        "num_buffer_tensors": len(entries) - len(params),
        "params_total": sum(e.numel for e in params),
        "params_trainable": sum(e.numel for e in params if e.trainable),
        "params_frozen": sum(e.numel for e in params if not e.trainable),
    }
    for part in ("backbone", "encoder", "decoder"):
        out[f"params_{part}"] = sum(e.numel for e in params if e.name.startswith(part + "."))
    return out
