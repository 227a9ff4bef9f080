"""Seeded weights drawn in numpy, shared by both backends.

``seeded_weights`` is the generator the golden reference (official RT-DETR code) used;
its rules are documented rule by rule below.  Both backends are always *loaded* from
such a dict: no framework RNG ever initialises a weight that a comparison depends on.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List

import numpy as np

from .param_spec import ParamEntry, param_spec


def seeded_weights(cfg_or_entries, seed: int = 3) -> "OrderedDict[str, np.ndarray]":
    """Weights for every state_dict entry, drawn in spec order from ``default_rng(seed)``.

    Rules (first match wins), draws in float64 then cast to float32:
      1. int64 entries (num_batches_tracked): zeros, no draw
      2. ``running_var``: U(0.5, 1.5)
      3. ``running_mean``: N(0, 0.1)
      4. rank >= 2: N(0, 1/sqrt(fan_in)) with fan_in = prod(shape[1:]); x0.01 for the last
         layer of every bbox head (keeps box deltas small)
      5. 1-D ``weight`` (BN / FrozenBN / LayerNorm scale): 1 + N(0, 0.1)
      6. ``enc_output.0.bias``: zeros, no draw (masked anchors then never enter the top-k)
      7. ``score_head`` biases: -log((1-0.01)/0.01) + N(0, 0.02) (prior probability 0.01)
      8. any other bias: N(0, 0.02)
    The dn class embedding's padding row is drawn like every other row (rule 4): the
    official forward looks it up, so it must not be zeroed.
    """
    entries: List[ParamEntry] = cfg_or_entries if isinstance(cfg_or_entries, list) else param_spec(cfg_or_entries)
    rng = np.random.default_rng(seed)
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    prior = -math.log((1 - 0.01) / 0.01)
    for e in entries:
        key, shape = e.name, e.shape
        leaf = key.rsplit(".", 1)[-1]
        if e.dtype == "int64":
            out[key] = np.zeros(shape, dtype=np.int64)
            continue
        if leaf == "running_var":
            v = rng.uniform(0.5, 1.5, shape)
        elif leaf == "running_mean":
            v = rng.normal(0.0, 0.1, shape)
        elif len(shape) >= 2:
            fan = int(np.prod(shape[1:]))
            v = rng.normal(0.0, 1.0 / math.sqrt(fan), shape)
            if "bbox_head" in key and ".layers.2." in key:
                v = v * 0.01
        elif leaf == "weight":
            v = 1.0 + rng.normal(0.0, 0.1, shape)
        elif key.endswith("enc_output.0.bias"):
            v = np.zeros(shape)
        elif "score_head" in key:
            v = prior + rng.normal(0.0, 0.02, shape)
        else:
            v = rng.normal(0.0, 0.02, shape)
        out[key] = np.asarray(v, dtype=np.float64).astype(np.float32)
    return out


def cast_weights(weights: Dict[str, np.ndarray], dtype: str) -> "OrderedDict[str, np.ndarray]":
    """Cast every floating entry to ``dtype`` (float32/float64); integer buffers keep int64."""
    out = OrderedDict()
    for k, v in weights.items():
        out[k] = v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v
    return out
