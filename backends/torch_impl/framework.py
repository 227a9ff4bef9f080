"""The one place where framework differences are handled (PyTorch side).

The Jittor backend needs real work here (import guard, two-pass normalisation layers,
padding-safe embedding, stable sigmoid).  PyTorch already does all of that, so this file
only exposes the same names as thin aliases; every other file of the backend imports
these names instead of reaching for framework specifics, so the two trees read alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "torch"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _misread_by_batchnorm_backward(g: torch.Tensor) -> bool:
    """True for the one gradient layout torch 2.13's CPU BatchNorm backward gets wrong: torch
    calls it channels-last contiguous, but its batch stride is not C*H*W (legal only because
    the batch dimension has size 1).  Measured: a canonical channels-last gradient, or the
    same strided gradient at batch 2 (not "contiguous" in any format, so torch copies it),
    are handled correctly."""
    return (g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last)
            and not g.is_contiguous() and g.stride(0) != g[0].numel())


class BatchNorm2d(nn.BatchNorm2d):
    """torch's BatchNorm2d (unbiased running variance, momentum 0.1, eps 1e-5; same keys),
    except that in training a gradient in the layout torch's backward misreads is first copied
    to its input's layout.

    Why: torch 2.13's CPU BatchNorm backward (train mode) silently returns wrong input,
    weight and bias gradients when the input is NCHW-contiguous and grad_output is
    channels-last with a non-canonical batch stride -- a legal layout at batch size 1, and
    exactly what ``feat.flatten(2).permute(0, 2, 1)`` + ``torch.cat`` (decoder memory, AIFI
    tokens) send back.  Measured: decoder.input_proj.*.norm.bias gradients 3x off at batch
    1; the official RT-DETR code has the same problem on this torch.  Every other layout is
    passed through untouched, so at batch >= 2 the gradients are bit-identical to the
    official code's (a copy would round the backward differently).
    Test: tests/test_torch_model.py::test_batchnorm_backward_strided_grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.training and y.requires_grad:
            fmt = _memory_format(x)
            y.register_hook(lambda g: g.contiguous(memory_format=fmt) if _misread_by_batchnorm_backward(g) else g)
        return y


# Other normalisation / embedding layers: torch's own are already what the contract wants
# (padding row looked up, zero grad).
LayerNorm = nn.LayerNorm
Embedding = nn.Embedding
MultiheadAttention = nn.MultiheadAttention
no_grad = torch.no_grad


def get_dtype(name: str) -> torch.dtype:
    """'float32' | 'float64' -> torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (float32, float64)") from None


def to_numpy(t) -> np.ndarray:
    """Any tensor (any device, with or without grad) -> numpy array that owns its memory
    (a CPU tensor's .numpy() would alias it: later in-place updates would show through)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    return t.clone().numpy() if t.device.type == "cpu" else t.cpu().numpy()


def from_numpy(arr, dtype: Optional[str] = None, device: str = "cpu") -> torch.Tensor:
    """numpy array -> tensor on ``device``; floating arrays are cast to ``dtype`` when given,
    integer arrays keep their integer type."""
    a = np.asarray(arr)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None and t.is_floating_point():
        t = t.to(get_dtype(dtype))
    return t.to(device)


def topk(x: torch.Tensor, k: int, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along ``dim``, descending."""
    return torch.topk(x, k, dim=dim)


def argmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.argmax(x, dim=dim)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor,
                    weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Element-wise (reduction none) binary cross entropy on logits, numerically stable."""
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
