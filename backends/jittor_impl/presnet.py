"""PResNet (ResNet-vd) backbone, official presnet.py structure and state_dict keys."""
from __future__ import annotations

from collections import OrderedDict

from jittor import nn

from . import framework as fw
from .capture import record
from .common import ConvNormLayer, FrozenBatchNorm2d, get_activation
from .normalization import BatchNorm2d

ResNet_cfg = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _shortcut(ch_in, ch_out, stride, variant):
    """Projection shortcut; variant d downsamples by 2x2 avg-pool then a 1x1 conv."""
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1))]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="b"):
        self.shortcut = shortcut
        if not shortcut:          # registered before the branches (official key order)
            self.short = _shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def execute(self, x):
        out = self.branch2b(self.branch2a(x))
        short = x if self.shortcut else self.short(x)
        return self.act(out + short)


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="b"):
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        width = ch_out
        self.branch2a = ConvNormLayer(ch_in, width, 1, stride1, act=act)
        self.branch2b = ConvNormLayer(width, width, 3, stride2, act=act)
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def execute(self, x):
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        short = x if self.shortcut else self.short(x)
        return self.act(out + short)


class Blocks(nn.Module):
    def __init__(self, block, ch_in, ch_out, count, stage_num, act="relu", variant="b"):
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, stride=2 if i == 0 and stage_num != 2 else 1,
                                     shortcut=i != 0, variant=variant, act=act))
            if i == 0:
                ch_in = ch_out * block.expansion

    def execute(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """x [B, 3, H, W] -> stage outputs at return_idx (strides 8, 16, 32 for [1, 2, 3]).

    freeze_at >= 0 freezes the stem (and the first freeze_at stages); freeze_norm replaces
    every BatchNorm2d by FrozenBatchNorm2d, as the official constructor does."""

    def __init__(self, depth, variant="d", num_stages=4, return_idx=(0, 1, 2, 3), act="relu",
                 freeze_at=-1, freeze_norm=True, pretrained=False):
        assert not pretrained, "weights are always loaded from a name -> array dict"
        block_nums = ResNet_cfg[depth]
        ch_in = 64
        if variant in ("c", "d"):
            conv_def = [[3, ch_in // 2, 3, 2, "conv1_1"], [ch_in // 2, ch_in // 2, 3, 1, "conv1_2"],
                        [ch_in // 2, ch_in, 3, 1, "conv1_3"]]
        else:
            conv_def = [[3, ch_in, 7, 2, "conv1_1"]]
        self.conv1 = nn.Sequential(OrderedDict([
            (name, ConvNormLayer(ci, co, k, s, act=act)) for ci, co, k, s, name in conv_def]))
        ch_out_list = [64, 128, 256, 512]
        block = BottleNeck if depth >= 50 else BasicBlock
        _out_channels = [block.expansion * v for v in ch_out_list]
        self.res_layers = nn.ModuleList()
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, ch_out_list[i], block_nums[i], i + 2,
                                          act=act, variant=variant))
            ch_in = _out_channels[i]
        self.return_idx = list(return_idx)
        self.out_channels = [_out_channels[i] for i in self.return_idx]
        self.out_strides = [[4, 8, 16, 32][i] for i in self.return_idx]
        self.max_pool = nn.Pool(3, 2, 1, op="maximum")   # torch max_pool2d(3, 2, 1)
        if freeze_norm:
            self._freeze_norm(self)
        if freeze_at >= 0:
            self._freeze_parameters(self.conv1)
            for i in range(min(freeze_at, num_stages)):
                self._freeze_parameters(self.res_layers[i])

    @staticmethod
    def _freeze_parameters(m: nn.Module) -> None:
        for p in m.parameters():
            fw.freeze(p)

    def _freeze_norm(self, m: nn.Module) -> nn.Module:
        """Swap every BatchNorm2d child for a FrozenBatchNorm2d (recursively)."""
        for name, child in list(m.named_children()):
            if isinstance(child, BatchNorm2d):
                new = FrozenBatchNorm2d(child.num_features)
                if isinstance(m, nn.Sequential):
                    m.layers[name] = new
                else:
                    setattr(m, name, new)
            else:
                self._freeze_norm(child)
        return m

    def execute(self, x):
        conv1 = self.conv1(x)
        record("backbone.conv1", conv1)
        x = self.max_pool(conv1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            record(f"backbone.res_layers.{idx}", x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
