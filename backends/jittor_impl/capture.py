"""Named intermediates: ``record(name, tensor)`` calls sit in the forward code and cost
nothing unless a :class:`Recorder` is active.  The names are the contract's (see
backends/README.md), so the first diverging name tells which module broke parity."""
from __future__ import annotations

from collections import OrderedDict
from typing import List

import numpy as np

from .framework import to_numpy

_ACTIVE: List["Recorder"] = []


class Recorder:
    """Context manager collecting recorded tensors in forward order.

    with Recorder() as rec:
        model(x)
    rec.numpy()  # OrderedDict[name -> np.ndarray]

    Vars are kept lazily (converting inside the forward would force a sync per name) and
    converted by ``numpy()``; Jittor index Vars (int32) come out as the contract's int64.
    Note: fetching intermediates changes Jittor's kernel fusion, so a captured forward can
    differ from an uncaptured one in the last bits (~1e-7 relative)."""

    def __init__(self) -> None:
        self.tensors: "OrderedDict[str, object]" = OrderedDict()

    def __enter__(self) -> "Recorder":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def add(self, name: str, tensor) -> None:
        # detach: a recorded value never joins the autograd graph (Vars are immutable)
        self.tensors[name] = tensor.detach()

    def numpy(self) -> "OrderedDict[str, np.ndarray]":
        out = OrderedDict()
        for k, v in self.tensors.items():
            a = to_numpy(v)
            out[k] = a.astype(np.int64) if a.dtype == np.int32 else a
        return out


def is_recording() -> bool:
    return bool(_ACTIVE)


def record(name: str, tensor) -> None:
    """Store ``tensor`` under ``name`` in the innermost active recorder, if any."""
    if _ACTIVE:
        _ACTIVE[-1].add(name, tensor)
