"""PResNet: ResNet-vd backbone (depths 18/34/50/101) as in the official RT-DETR."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import record
from .common import ConvNormLayer, FrozenBatchNorm2d, get_activation
from .normalization import BatchNorm2d

RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _shortcut(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    """Projection shortcut; variant d replaces the strided 1x1 conv by avg-pool + 1x1 conv."""
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convs + shortcut (depth 18/34).  x [B, ch_in, H, W] -> [B, ch_out, H/s, W/s]"""
    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act="relu", variant="b"):
        super().__init__()
        self.shortcut = shortcut
        # Registered before the branches: fixes the official state_dict order.  Every first
        # block gets a projection, even stage 0 where the channel count does not change.
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        short = x if self.shortcut else self.short(x)
        return self.act(out + short)


class BottleNeck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) + shortcut (depth 50/101).

    x [B, ch_in, H, W] -> [B, 4*ch_out, H/s, W/s]; variant a strides the first conv, the
    others the 3x3 conv.
    """
    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act="relu", variant="b"):
        super().__init__()
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        width = ch_out
        self.branch2a = ConvNormLayer(ch_in, width, 1, stride1, act=act)
        self.branch2b = ConvNormLayer(width, width, 3, stride2, act=act)
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        short = x if self.shortcut else self.short(x)
        return self.act(out + short)


class Blocks(nn.Module):
    """One stage: ``count`` blocks, the first strided (except stage 2 = res_layers.0)."""

    def __init__(self, block, ch_in: int, ch_out: int, count: int, stage_num: int, act="relu", variant="b"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if (i == 0 and stage_num != 2) else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=(i != 0), act=act, variant=variant))
            if i == 0:
                ch_in = ch_out * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """x [B, 3, H, W] -> list of stage outputs selected by ``return_idx``
    (default [1, 2, 3]: strides 8, 16, 32).

    freeze_at >= 0 freezes the stem's parameters, and stages 0..freeze_at-1 too;
    freeze_norm turns every BatchNorm2d into FrozenBatchNorm2d (buffers only).
    """

    def __init__(self, depth: int, variant: str = "d", num_stages: int = 4,
                 return_idx: Sequence[int] = (0, 1, 2, 3), act: str = "relu",
                 freeze_at: int = -1, freeze_norm: bool = True):
        super().__init__()
        ch_in = 64
        if variant in ("c", "d"):
            stem = [(3, ch_in // 2, 3, 2, "conv1_1"), (ch_in // 2, ch_in // 2, 3, 1, "conv1_2"),
                    (ch_in // 2, ch_in, 3, 1, "conv1_3")]
        else:
            stem = [(3, ch_in, 7, 2, "conv1_1")]
        self.conv1 = nn.Sequential(OrderedDict([
            (name, ConvNormLayer(ci, co, k, s, act=act)) for ci, co, k, s, name in stem]))

        block = BottleNeck if depth >= 50 else BasicBlock
        ch_out_list = [64, 128, 256, 512]
        out_channels = [block.expansion * c for c in ch_out_list]
        self.res_layers = nn.ModuleList()
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, ch_out_list[i], RESNET_BLOCKS[depth][i],
                                          i + 2, act=act, variant=variant))
            ch_in = out_channels[i]

        self.return_idx = list(return_idx)
        self.out_channels = [out_channels[i] for i in self.return_idx]
        self.out_strides = [[4, 8, 16, 32][i] for i in self.return_idx]

        if freeze_at >= 0:
            self._freeze_parameters(self.conv1)
            for i in range(min(freeze_at, num_stages)):
                self._freeze_parameters(self.res_layers[i])
        if freeze_norm:
            self._freeze_norm(self)

    @staticmethod
    def _freeze_parameters(m: nn.Module) -> None:
        for p in m.parameters():
            p.requires_grad = False

    def _freeze_norm(self, m: nn.Module) -> nn.Module:
        """Replace BatchNorm2d children in place (same attribute names, same order)."""
        if isinstance(m, BatchNorm2d):
            return FrozenBatchNorm2d(m.num_features)
        for name, child in m.named_children():
            new = self._freeze_norm(child)
            if new is not child:
                setattr(m, name, new)
        return m

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        conv1 = self.conv1(x)
        record("backbone.conv1", conv1)
        x = F.max_pool2d(conv1, kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            record(f"backbone.res_layers.{idx}", x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
