"""Building blocks shared by backbone, encoder and decoder (official utils.py/common.py)."""
from __future__ import annotations

import math
from typing import Dict

from jittor import nn

from . import framework as fw
from .conv import Conv2d
from .framework import jt
from .normalization import BatchNorm2d


class SiLU(nn.Module):
    """x * sigmoid(x) with the stable sigmoid (Jittor's saturates at -30)."""

    def execute(self, x):
        return x * fw.sigmoid(x)


class ReLU(nn.Module):
    def execute(self, x):
        return fw.relu(x)


class GELU(nn.Module):
    """Exact (erf) GELU, torch's default: x/2 (1 + erf(x / sqrt 2)) (``nn.gelu`` and the
    gradient of ``jt.erf`` use float32 constants, 1.3e-8 off in float64 graphs)."""

    def execute(self, x):
        return fw.gelu(x)


class Dropout(nn.Module):
    """Identity for p == 0 (RT-DETR's setting); follows ``set_training`` (a fresh
    ``jt.nn.Dropout`` starts in eval mode)."""

    def __init__(self, p: float = 0.0):
        self.p = p

    def execute(self, x):
        return nn.dropout(x, self.p, is_train=True) if self.p > 0 and self.is_training() else x


class Identity(nn.Module):
    def execute(self, x):
        return x


def get_activation(act, inpace: bool = True) -> nn.Module:
    """'silu' | 'relu' | 'gelu' | None -> module (``inpace`` kept for signature parity)."""
    if act is None:
        return Identity()
    if isinstance(act, nn.Module):
        return act
    table = {"silu": SiLU, "relu": ReLU, "gelu": GELU}
    if act.lower() not in table:
        raise RuntimeError(f"unsupported activation {act!r}")
    return table[act.lower()]()


class ConvNormLayer(nn.Module):
    """conv (no bias by default) -> BatchNorm2d -> act; padding (k-1)//2 unless given."""

    def __init__(self, ch_in, ch_out, kernel_size, stride, padding=None, bias=False, act=None):
        self.conv = Conv2d(ch_in, ch_out, kernel_size, stride,
                           padding=(kernel_size - 1) // 2 if padding is None else padding,
                           bias=bool(bias))
        self.norm = BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def execute(self, x):
        return self.act(self.norm(self.conv(x)))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms: four buffers (stop_grad), no
    num_batches_tracked.  y = x * w / sqrt(rv + eps) + (b - rm * scale)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        self.num_features, self.eps = num_features, eps
        self.weight = fw.freeze(jt.ones(num_features))
        self.bias = fw.freeze(jt.zeros(num_features))
        self.running_mean = fw.freeze(jt.zeros(num_features))
        self.running_var = fw.freeze(jt.ones(num_features))

    def execute(self, x):
        scale = self.weight * (1.0 / jt.sqrt(self.running_var + fw.scalar(self.eps, self.running_var)))
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class MLP(nn.Module):
    """num_layers Linear layers, act between them (not after the last)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, act="relu"):
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList([nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim])])
        self.act = get_activation(act)

    def execute(self, x):
        for i, layer in enumerate(self.layers):
            x = self.act(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def inverse_sigmoid(x, eps: float = 1e-5):
    """log(x / (1 - x)) with x clipped to [0, 1] and both terms floored at eps (torch clamp
    gradient semantics, see framework.clamp)."""
    x = fw.clamp(x, min=0.0, max=1.0)
    return jt.log(fw.clamp(x, min=eps) / fw.clamp(1 - x, min=eps))


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    return float(-math.log((1 - prior_prob) / prior_prob))


def named_batchnorms(model) -> Dict[str, BatchNorm2d]:
    """state_dict prefix -> BatchNorm2d module (holder of num_batches_tracked)."""
    out, stack = {}, []

    def cb(parents, k, m, n):
        stack.append(str(k))
        if isinstance(m, BatchNorm2d):
            out[".".join(stack[1:])] = m

    model.dfs([], None, cb, lambda *a: stack.pop())
    return out
