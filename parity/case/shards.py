"""One rank's share of a global batch (``--nproc N``): which images, and the digest that
proves a rank consumed exactly them.

The global batch of B images is cut into N contiguous shards of B / N images (rank r takes
images ``r*B/N .. (r+1)*B/N - 1``), as a DistributedSampler without shuffling hands out a
batch that was drawn once for every rank.  The denoising draws are the global batch's rows
for those images, with the global batch's max boxes per image (``rtdetr_core.denoising``:
``with_max_gt`` / ``shard_draws``), so a rank builds exactly its rows of the single-process
dn queries, and a rank whose images hold no box still runs the same graph as the others.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from rtdetr_core.denoising import DN_DRAW_KEYS, shard_draws, with_max_gt

from parity.case.train import epoch_file, load_data, read_epoch_streams

Targets = List[Dict[str, np.ndarray]]


class ShardError(ValueError):
    pass


def shard_bounds(batch: int, nproc: int, rank: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s images in a global batch of ``batch``."""
    if nproc < 1 or not 0 <= rank < nproc:
        raise ShardError(f"rank {rank} of {nproc} processes")
    if batch % nproc:
        raise ShardError(f"a global batch of {batch} images does not split over {nproc} processes "
                         f"(each rank takes batch / nproc images: use a multiple of {nproc})")
    per = batch // nproc
    return rank * per, (rank + 1) * per


def shard_inputs(images: np.ndarray, targets: Targets, draws: Optional[Dict[str, np.ndarray]], nproc: int,
                 rank: int) -> Tuple[np.ndarray, Targets, Optional[Dict[str, np.ndarray]]]:
    """Rank ``rank``'s images [B/N, 3, H, W], targets and denoising draws."""
    a, b = shard_bounds(images.shape[0], nproc, rank)
    counts = [len(t["labels"]) for t in targets]
    return images[a:b], targets[a:b], shard_draws(with_max_gt(draws, counts), a, b)


def shard_digest(images: np.ndarray, targets: Targets, draws: Optional[Dict[str, np.ndarray]]) -> str:
    """sha256 (16 hex) of a shard's images, boxes, labels and draws: what a rank consumed."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    for t in targets:
        h.update(np.ascontiguousarray(t["labels"], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(t["boxes"], dtype=np.float64).tobytes())
        h.update(b"|")
    for k in DN_DRAW_KEYS + ("max_gt",):
        if draws is not None and k in draws:
            h.update(k.encode())
            h.update(np.ascontiguousarray(draws[k]).tobytes())
    return h.hexdigest()[:16]


def expected_digests(images: np.ndarray, targets: Targets, draws, nproc: int) -> List[str]:
    """The digest every rank must report, rank order."""
    return [shard_digest(*shard_inputs(images, targets, draws, nproc, r)) for r in range(nproc)]


def expected_train_digests(case_dir: str, epochs: Sequence[int], nproc: int) -> Dict[int, List[str]]:
    """Iteration number (1-based, over the epochs in order) -> every rank's shard digest, from
    the train case's streams (what ``parity.workers.train`` ranks must report)."""
    data = load_data(case_dir)
    images_all, targets_all = data["train_images"], data["train_targets"]
    out: Dict[int, List[str]] = {}
    it_no = 0
    for e in epochs:
        _, its = read_epoch_streams(epoch_file(case_dir, e))
        for it in its:
            it_no += 1
            idx = it["indices"]
            out[it_no] = expected_digests(images_all[idx], [targets_all[int(i)] for i in idx], it["dn_draws"], nproc)
    return out
