"""Deterministic batching: seeded epoch order, stacking, multi-scale and denoising draws.

``iterate_batches(dataset, batch_size, seed=..., epoch=...)`` yields ``(images, targets, meta)``:

* ``images``: [B, 3, H, W] (every item already has the dataset's ``image_size``, so they stack);
* ``targets``: list of B target dicts (``labels`` int64 [n], ``boxes`` [n, 4] normalised cxcywh, ...);
* ``meta``: ``{"epoch", "step", "indices" int64 [B], "image_ids" int64 [B], "orig_sizes" int64
  [B, 2] (h, w), "multi_scale_size": int | None, "dn_draws": dict | None}``.

Order: ``rtdetr_core.rng.epoch_order(len(dataset), seed, epoch)`` — stateless, identical in
both environments.  Multi-scale: when ``multi_scale`` is a list of sizes, one size per
iteration is drawn from the ``scale`` stream (:func:`rtdetr_core.rng.draw_multi_scale`); the
images are NOT resized here — as in the official ``RTDETR.forward``, the model interpolates
its input to ``[s, s]`` (the backends' ``multi_scale_size`` argument); normalised boxes do
not change.  Denoising: with ``num_denoising > 0`` the batch's dn draws come from the
``denoise`` stream (:func:`rtdetr_core.denoising.draw_denoising`).  Keep one
:class:`~rtdetr_core.rng.Streams` per run (``BatchLoader`` does) so that draws continue
across epochs exactly alike in both backends.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..denoising import draw_denoising
from ..rng import Streams, draw_multi_scale, epoch_order


def collate(samples: Sequence[Tuple[np.ndarray, Dict[str, Any]]], dtype=None) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Stack ``[(image [3,H,W], target), ...]`` into ``(images [B,3,H,W], targets)``."""
    if not samples:
        raise ValueError("collate: empty batch")
    shapes = {s[0].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: images of different sizes {sorted(shapes)} cannot be stacked "
                         f"(give the dataset a fixed image_size)")
    images = np.stack([s[0] for s in samples])
    if dtype is not None:
        images = images.astype(dtype, copy=False)
    return images, [s[1] for s in samples]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(dataset, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                    drop_last: bool = False, multi_scale: Optional[Sequence[int]] = None,
                    streams: Optional[Streams] = None, num_denoising: int = 0,
                    num_classes: Optional[int] = None, dtype=None,
                    ) -> Iterator[Tuple[np.ndarray, List[Dict[str, Any]], Dict[str, Any]]]:
    """Batches of one epoch (see the module docstring).  ``streams``: the run's generators
    (default: fresh ``Streams(seed)``, i.e. the draws restart at every call)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_denoising > 0 and num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_denoising > 0 needs num_classes")
    st = streams if streams is not None else Streams(seed)
    order = epoch_order(len(dataset), seed, epoch, shuffle=shuffle)
    for step in range(num_batches(len(order), batch_size, drop_last)):
        idx = order[step * batch_size:(step + 1) * batch_size]
        images, targets = collate([dataset[int(i)] for i in idx], dtype=dtype)
        size = draw_multi_scale(st.scale, multi_scale)
        dn = None
        if num_denoising > 0:
            dn = draw_denoising(st.denoise, [len(t["labels"]) for t in targets], num_denoising, num_classes)
        meta = {
            "epoch": int(epoch),
            "step": step,
            "indices": idx.astype(np.int64),
            "image_ids": np.asarray([t.get("image_id", -1) for t in targets], dtype=np.int64),
            "orig_sizes": np.stack([np.asarray(t.get("orig_size", images.shape[2:]), dtype=np.int64)
                                    for t in targets]),
            "multi_scale_size": size,
            "dn_draws": dn,
        }
        yield images, targets, meta


class BatchLoader:
    """Epoch-aware batch source holding the run's :class:`Streams`.

    ``for epoch in range(E): loader.set_epoch(epoch); for images, targets, meta in loader: ...``
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, multi_scale: Optional[Sequence[int]] = None,
                 num_denoising: int = 0, num_classes: Optional[int] = None, dtype=None,
                 streams: Optional[Streams] = None):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.multi_scale = list(multi_scale) if multi_scale else None
        self.num_denoising = int(num_denoising)
        self.num_classes = num_classes
        self.dtype = dtype
        self.streams = streams if streams is not None else Streams(self.seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size, self.drop_last)

    def __iter__(self):
        return iterate_batches(self.dataset, self.batch_size, seed=self.seed, epoch=self.epoch,
                               shuffle=self.shuffle, drop_last=self.drop_last,
                               multi_scale=self.multi_scale, streams=self.streams,
                               num_denoising=self.num_denoising, num_classes=self.num_classes,
                               dtype=self.dtype)


def loader_from_config(cfg, dataset, *, seed: int = 0, train: bool = True, dtype=None,
                       denoising: Optional[bool] = None) -> BatchLoader:
    """A ``BatchLoader`` with the config's batch size; for training: shuffled, multi-scale
    from ``cfg.train.multi_scale`` and dn draws for ``cfg.decoder.num_denoising`` (unless
    ``denoising=False``); for evaluation: dataset order, no draws."""
    use_dn = train if denoising is None else denoising
    return BatchLoader(dataset, cfg.train.batch_size, seed=seed, shuffle=train, drop_last=False,
                       multi_scale=cfg.train.multi_scale if train else None,
                       num_denoising=cfg.decoder.num_denoising if use_dn else 0,
                       num_classes=cfg.num_classes, dtype=dtype)
