"""Named, independent, seeded numpy random streams shared by both backends.

Every random draw of a training run that both backends must agree on comes from here,
never from a framework RNG:

* ``order``   – data order (the loader itself uses the stateless :func:`epoch_order`,
  so that any epoch can be replayed alone; ``order`` is there for other order draws);
* ``denoise`` – the contrastive-denoising draws (:func:`rtdetr_core.denoising.draw_denoising`);
* ``scale``   – the multi-scale training size of each iteration (:func:`draw_multi_scale`).

Each stream is a ``numpy.random.Generator`` (PCG64) seeded by
``SeedSequence(seed, spawn_key=(k,))`` where ``k`` is the stream's fixed index in
:data:`STREAM_NAMES` — exactly the children ``SeedSequence(seed).spawn(3)`` would give, but
independent of the order in which they are asked for.  The streams are statistically
independent of each other and of the per-epoch order generators ``default_rng([seed, epoch])``
(different entropy pools).  PCG64/SeedSequence and the ``Generator`` methods used here
(``random``, ``integers``, ``permutation``) give the same numbers under numpy 1.26 and 2.x,
so the two environments consume identical draws (a test checks this across interpreters).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

STREAM_NAMES = ("order", "denoise", "scale")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def stream(seed: int, name: str, *extra_key: int) -> np.random.Generator:
    """One named stream, fresh (at its start).  ``extra_key`` derives a sub-stream, e.g.
    ``stream(seed, "scale", epoch)`` for draws that must not depend on earlier epochs."""
    seed = _check_seed(seed)
    if name not in STREAM_NAMES:
        raise ValueError(f"unknown random stream {name!r} (streams: {', '.join(STREAM_NAMES)})")
    key = (STREAM_NAMES.index(name),) + tuple(int(k) for k in extra_key)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class Streams:
    """The run's generators, one attribute per name in :data:`STREAM_NAMES`.

    Keep one ``Streams`` object for a whole run: each generator then continues where the
    previous iteration stopped, identically in both backends.
    """

    def __init__(self, seed: int, *extra_key: int):
        self.seed = _check_seed(seed)
        self.extra_key = tuple(int(k) for k in extra_key)
        self.order: np.random.Generator = stream(seed, "order", *self.extra_key)
        self.denoise: np.random.Generator = stream(seed, "denoise", *self.extra_key)
        self.scale: np.random.Generator = stream(seed, "scale", *self.extra_key)

    def __getitem__(self, name: str) -> np.random.Generator:
        if name not in STREAM_NAMES:
            raise KeyError(f"unknown random stream {name!r} (streams: {', '.join(STREAM_NAMES)})")
        return getattr(self, name)

    def for_epoch(self, epoch: int) -> "Streams":
        """Fresh streams for one epoch (``spawn_key=(k, epoch)``): use these instead of a
        run-long object when an epoch must be reproducible on its own (resumed runs)."""
        return Streams(self.seed, *self.extra_key, int(epoch))

    def state(self) -> Dict[str, dict]:
        """Bit-generator states (JSON-able) — to checkpoint or compare two runs."""
        return {n: getattr(self, n).bit_generator.state for n in STREAM_NAMES}

    def set_state(self, state: Dict[str, dict]) -> None:
        for n in STREAM_NAMES:
            getattr(self, n).bit_generator.state = state[n]

    def __repr__(self) -> str:
        extra = f", extra_key={self.extra_key}" if self.extra_key else ""
        return f"Streams(seed={self.seed}{extra})"


def streams(seed: int, *extra_key: int) -> Streams:
    """``streams(seed)`` → object with ``.order``, ``.denoise``, ``.scale`` generators."""
    return Streams(seed, *extra_key)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Dataset indices of one epoch, int64 [n]: ``default_rng([seed, epoch]).permutation(n)``
    (``arange(n)`` when ``shuffle`` is False).  Stateless: any epoch can be replayed alone."""
    seed = _check_seed(seed)
    if int(n) < 0:
        raise ValueError(f"dataset size must be >= 0, got {n}")
    if not shuffle:
        return np.arange(int(n), dtype=np.int64)
    rng = np.random.default_rng([seed, int(epoch)])
    return rng.permutation(int(n)).astype(np.int64)


def draw_multi_scale(rng: np.random.Generator, sizes: Optional[Sequence[int]]) -> Optional[int]:
    """The size of one training iteration, as the official ``np.random.choice(multi_scale)``
    in ``RTDETR.forward`` (square ``[s, s]``), but from a seeded stream:
    ``sizes[rng.integers(len(sizes))]``.  ``None``/empty ``sizes`` → ``None`` (no draw made)."""
    if not sizes:
        return None
    return int(sizes[int(rng.integers(0, len(sizes)))])
