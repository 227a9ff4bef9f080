"""Small building blocks shared by backbone, encoder and decoder."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .normalization import BatchNorm2d


def get_activation(act, inplace: bool = True) -> nn.Module:
    """'relu' | 'silu' | 'gelu' | 'leaky_relu' | None -> module (GELU is the exact erf form)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    name = act.lower()
    if name == "relu":
        m = nn.ReLU()
    elif name == "silu":
        m = nn.SiLU()
    elif name == "gelu":
        m = nn.GELU()
    elif name == "leaky_relu":
        m = nn.LeakyReLU()
    else:
        raise ValueError(f"unsupported activation {act!r}")
    if hasattr(m, "inplace"):
        m.inplace = inplace
    return m


class ConvNormLayer(nn.Module):
    """Conv2d (no bias, 'same' padding for odd kernels) -> BatchNorm2d -> activation.

    x [B, ch_in, H, W] -> [B, ch_out, H/stride, W/stride]
    """

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int,
                 padding=None, bias: bool = False, act=None):
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=pad, bias=bool(bias))
        self.norm = BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all four stored as buffers.

    Same arithmetic as the official layer (scale folded first, eps inside the rsqrt), so
    outputs are bit-identical.  A ``num_batches_tracked`` entry in a loaded state_dict is
    dropped, as the official layer does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H, W]"""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class MLP(nn.Module):
    """``num_layers`` Linear layers with ``act`` between them (none after the last).

    x [..., input_dim] -> [..., output_dim]
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act="relu"):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_layers))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clipped to [0, 1] and both terms floored at eps."""
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Logit of ``prior_prob`` (the classification bias prior)."""
    return float(-math.log((1 - prior_prob) / prior_prob))
