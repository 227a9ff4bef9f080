"""The random draws of contrastive denoising, made in numpy and shared by both backends.

The official ``get_contrastive_denoising_training_group`` draws four tensors from the
torch RNG.  Here they come from a seeded numpy generator instead, with the same shapes,
dtypes and meaning, so that both backends (and a replay of the official draws) build the
very same dn queries.  See GOLDEN.md section 5 for how they are used.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def dn_layout(counts: Sequence[int], num_denoising: int, max_gt: Optional[int] = None) -> Optional[Dict[str, int]]:
    """Group layout for a batch whose images hold ``counts`` boxes.

    Returns None when denoising is off for the batch (no boxes at all, or num_denoising 0).
    ``G`` = max boxes per image, ``num_group`` = num_denoising // G (at least 1),
    ``num_dn`` = 2 * G * num_group queries per image (positives then negatives per group).
    ``max_gt``: G of the global batch when this batch is one rank's shard of it (data
    parallel): every rank then builds the global batch's layout, so a rank holds exactly
    its images' rows of the single-process dn queries, and a rank whose shard has no boxes
    still runs the same graph as the others (all its dn slots are padding).
    """
    if num_denoising <= 0:
        return None
    g = int(max(counts)) if len(counts) else 0
    if max_gt is not None:
        if int(max_gt) < g:
            raise ValueError(f"dn layout: max_gt {max_gt} of the global batch is below this shard's {g}")
        g = int(max_gt)
    if g == 0:
        return None
    num_group = max(num_denoising // g, 1)
    return {"max_gt": g, "num_group": num_group, "num_dn": 2 * g * num_group}


def draw_denoising(rng: np.random.Generator, counts: Sequence[int], num_denoising: int,
                   num_classes: int) -> Optional[Dict[str, np.ndarray]]:
    """The four draws, in the official order, for a batch of ``len(counts)`` images.

    Returns ``None`` when the batch gets no denoising, else a dict:
      label_mask_rand  [B, N_dn]    float32  U[0,1)      (label-noise selection)
      new_label        [B, N_dn]    int32    0..C-1      (replacement labels)
      box_sign_rand01  [B, N_dn, 4] float32  {0., 1.}    (sign of each box corner shift)
      box_rand_part    [B, N_dn, 4] float32  U[0,1)      (magnitude of each shift)
    """
    lay = dn_layout(counts, num_denoising)
    if lay is None:
        return None
    b, n = len(counts), lay["num_dn"]
    return {
        "label_mask_rand": rng.random((b, n), dtype=np.float32),
        "new_label": rng.integers(0, num_classes, (b, n)).astype(np.int32),
        "box_sign_rand01": rng.integers(0, 2, (b, n, 4)).astype(np.float32),
        "box_rand_part": rng.random((b, n, 4), dtype=np.float32),
    }


DN_DRAW_KEYS = ("label_mask_rand", "new_label", "box_sign_rand01", "box_rand_part")
# optional entry of a draws dict: G of the global batch (int), set on one rank's shard
DN_MAX_GT_KEY = "max_gt"


def shard_draws(draws: Optional[Dict[str, np.ndarray]], start: int, stop: int) -> Optional[Dict[str, np.ndarray]]:
    """Rows ``start:stop`` (one rank's images) of a global batch's draws, with the global
    batch's G under ``DN_MAX_GT_KEY`` so the shard keeps the global layout (``dn_layout``)."""
    if draws is None:
        return None
    g = int(draws[DN_MAX_GT_KEY]) if DN_MAX_GT_KEY in draws else None
    out = {k: np.asarray(draws[k])[start:stop] for k in DN_DRAW_KEYS}
    if g is None:
        # num_dn = 2 * G * (num_denoising // G) does not give G back: the caller's layout does
        raise ValueError("shard_draws: the global draws carry no max_gt (use with_max_gt first)")
    out[DN_MAX_GT_KEY] = np.asarray(g, dtype=np.int64)
    return out


def with_max_gt(draws: Optional[Dict[str, np.ndarray]], counts: Sequence[int]) -> Optional[Dict[str, np.ndarray]]:
    """The global batch's draws with its G recorded (before they are sharded)."""
    if draws is None:
        return None
    out = dict(draws)
    out[DN_MAX_GT_KEY] = np.asarray(int(max(counts)) if len(counts) else 0, dtype=np.int64)
    return out
