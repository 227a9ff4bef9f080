"""Where a run's images come from: ``--data`` resolved to a COCO-layout folder.

* ``None``: the bundled synthetic set (seed 0, 50 train + 50 val images);
* ``synthetic:SEED:N_TRAIN:N_VAL``: another synthetic set, generated on first use into the
  cache (``ensure_synthetic_dataset``) -- e.g. ``synthetic:1:2000:50`` is the pre-training
  split of the seed experiment, disjoint from the bundled set because every image is drawn
  from ``default_rng([seed, split, index])``.  A spec reproduces byte-identical files on
  any machine, so a command line that uses it needs no download and no copied folder;
* anything else: a folder laid out as COCO 2017 (checked when a split is opened).
"""
from __future__ import annotations

from typing import Optional

from .errors import DataError
from .synthetic import ensure_synthetic_dataset

PREFIX = "synthetic:"


def resolve_data(spec: Optional[str]) -> str:
    """The folder of ``spec`` (see the module docstring); a malformed synthetic spec is one
    line (:class:`DataError`) naming it."""
    if spec is None:
        return ensure_synthetic_dataset()
    if not spec.startswith(PREFIX):
        return spec
    parts = spec[len(PREFIX):].split(":")
    try:
        seed, n_train, n_val = (int(p) for p in parts)
    except ValueError:
        raise DataError(f"--data {spec}: expected synthetic:SEED:N_TRAIN:N_VAL with integers, "
                        f"e.g. synthetic:1:2000:50") from None
    try:
        return ensure_synthetic_dataset(seed=seed, n_train=n_train, n_val=n_val)
    except ValueError as e:          # the generator's own argument checks
        raise DataError(f"--data {spec}: {e}") from None
