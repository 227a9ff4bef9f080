"""The worker <-> runner file contract of ``parity run --stage forward|grad`` beyond the case
folder: the *decisions file* one side's discrete choices are handed to another with
(``--share-decisions FILE.npz``)::

    topk_index            int64 [B, Q]   the encoder's top-k selection (eval-mode pass)
    train_topk_index      int64 [B, Q]   the same of the forward stage's train-mode pass
    matches/<call>/<i>    int64 [2, n]   the Hungarian assignment of one loss call, image i

The runner writes it from a worker's result npz (``write_decisions_from``: ``dec/topk``,
``train/dec/topk``, ``match/<call>/<i>`` and the call order in the result's meta); the
worker reads it with ``read_decisions``.  numpy only: both environments import this.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from parity.fileio import read_npz_meta, write_npz


def read_decisions(path: str):
    """``(topk_index, matches, train_topk_index)`` from a share-decisions npz, each None when
    absent (``train_topk_index``: the forward stage's train-mode pass)."""
    with np.load(path, allow_pickle=False) as z:
        topk = z["topk_index"].astype(np.int64) if "topk_index" in z.files else None
        train_topk = z["train_topk_index"].astype(np.int64) if "train_topk_index" in z.files else None
        calls: "OrderedDict[str, Dict[int, np.ndarray]]" = OrderedDict()
        for k in z.files:
            if k.startswith("matches/"):
                _, call, i = k.split("/")
                calls.setdefault(call, {})[int(i)] = z[k].astype(np.int64).reshape(2, -1)
    matches = OrderedDict((c, [d[i] for i in sorted(d)]) for c, d in calls.items()) or None
    return topk, matches, train_topk


def write_decisions(path: str, topk: Optional[np.ndarray], matches: Optional[Dict[str, List[np.ndarray]]],
                    train_topk: Optional[np.ndarray] = None) -> None:
    arrays: Dict[str, np.ndarray] = {}
    if topk is not None:
        arrays["topk_index"] = np.asarray(topk, dtype=np.int64)
    if train_topk is not None:
        arrays["train_topk_index"] = np.asarray(train_topk, dtype=np.int64)
    for call, lst in (matches or {}).items():
        for i, m in enumerate(lst):
            arrays[f"matches/{call}/{i}"] = np.asarray(m, dtype=np.int64).reshape(2, -1)
    write_npz(path, arrays)


def write_decisions_from(result_npz: str, dest: str) -> bool:
    topk = train_topk = None
    matches: Dict[str, Dict[int, np.ndarray]] = OrderedDict()
    with np.load(result_npz, allow_pickle=False) as z:
        meta = read_npz_meta(z)
        if "dec/topk" in z.files:
            topk = z["dec/topk"]
        if "train/dec/topk" in z.files:
            train_topk = z["train/dec/topk"]
        for call in meta.get("order", {}).get("matches", []):
            d = {}
            for k in z.files:
                if k.startswith(f"match/{call}/"):
                    d[int(k.rsplit("/", 1)[1])] = z[k]
            matches[call] = [d[i] for i in sorted(d)]
    if topk is None and train_topk is None and not matches:
        return False
    write_decisions(dest, topk, matches or None, train_topk=train_topk)
    return True
