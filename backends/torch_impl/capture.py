"""Named intermediates: ``record(name, tensor)`` calls sit in the forward code and cost
nothing unless a :class:`Recorder` is active.  The names are the contract's (see
backends/README.md), so the first diverging name tells which module broke parity."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, List, Optional, Union

import numpy as np

from .framework import to_numpy

_ACTIVE: List["Recorder"] = []


class Recorder:
    """Context manager collecting recorded tensors in forward order.

    with Recorder() as rec:
        model(x)
    rec.numpy()  # OrderedDict[name -> np.ndarray]
    """

    def __init__(self, names: Optional[Iterable[str]] = None, evidence: bool = True) -> None:
        # names: record only these intermediates (None: all).  evidence=False: no decision
        # evidence either (the train loop's own top-k index, logged every iteration, must not
        # cost a cost matrix nor, in Jittor, a mid-graph sync that changes kernel fusion)
        self.only = None if names is None else frozenset(names)
        self.evidence = evidence
        self.tensors: "OrderedDict[str, object]" = OrderedDict()
        # evidence behind the discrete decisions (encoder scores, matching costs, this side's
        # own choice when the harness injected another's): kept apart from the intermediates,
        # which are compared tensor by tensor
        self.decisions: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def __enter__(self) -> "Recorder":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def add(self, name: str, tensor) -> None:
        if self.only is not None and name not in self.only:
            return
        # clone: later in-place ops (inplace activations) must not alter what was seen
        self.tensors[name] = tensor.detach().clone()

    def numpy(self) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict((k, to_numpy(v)) for k, v in self.tensors.items())


def active() -> bool:
    """True while a Recorder is collecting (lets callers skip work done only for capture)."""
    return bool(_ACTIVE)


def wants_evidence() -> bool:
    """True while the innermost recorder keeps decision evidence (lets callers skip computing it)."""
    return bool(_ACTIVE) and _ACTIVE[-1].evidence


def recorder_for(capture: Union[bool, Iterable[str]]) -> Optional[Recorder]:
    """The Recorder an adapter call's ``capture`` asks for: None (False), every intermediate
    (True), or only the named ones (a sequence of names: cheap, e.g. the top-k selection)."""
    if capture is True:
        return Recorder()
    return Recorder(capture) if capture else None


def record(name: str, tensor) -> None:
    """Store ``tensor`` under ``name`` in the innermost active recorder, if any."""
    if _ACTIVE:
        _ACTIVE[-1].add(name, tensor)


def note_decision(name: str, value) -> None:
    """Keep ``value`` (a tensor, array or list of int64 [2, n] arrays) as evidence of a discrete
    decision (``topk_scores`` [B, S], ``topk_own`` [B, Q], ``match_cost/<call>`` [B, Q, T],
    ``match_own/<call>``) in the innermost active recorder, if it keeps evidence."""
    if not wants_evidence():
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _ACTIVE[-1].decisions[f"{name}/{i}"] = np.asarray(v, dtype=np.int64).reshape(2, -1)
    else:
        a = value if isinstance(value, np.ndarray) else to_numpy(value.detach())
        _ACTIVE[-1].decisions[name] = a.astype(np.int64) if a.dtype == np.int32 else a
