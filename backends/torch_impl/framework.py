"""The one place where framework differences are handled (PyTorch side).

The Jittor backend needs real work here (import guard, padding-safe embedding, stable
sigmoid).  PyTorch already does all of that, so this file only exposes the same names as
thin aliases; every other file of the backend imports these names instead of reaching for
framework specifics, so the two trees read alike.  Normalisation layers and attention have
files of their own on both sides (``normalization.py``, ``attention.py``); the optimiser
is in ``optim.py`` (``torch.optim.AdamW`` here).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "torch"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# torch's Embedding is already what the contract wants (padding row looked up, zero grad);
# the normalisation layers are in normalization.py, attention in attention.py.
Embedding = nn.Embedding
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
