"""read_weights / convert: the library entry points."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .errors import WeightsError
from .formats import read_raw, to_numpy, write_weights
from .layout import unwrap
from .validate import validate


def read_weights(path: str, config: Any = None, *, fmt: Optional[str] = None,
                 drop_mismatched_heads: bool = False,
                 dtype: Optional[str] = None) -> Tuple["OrderedDict[str, np.ndarray]", Dict[str, Any]]:
    """Read a weights file safely: ``(OrderedDict name -> numpy array, info)``.

    Formats (from the extension, else sniffed; or ``fmt``): PyTorch ``.pth/.pt/.bin``
    (``torch.load(weights_only=True)``, torch env only), Jittor ``.pkl`` (restricted
    unpickler, Jittor not needed), ``.safetensors``, ``.npz`` (``allow_pickle=False``).
    Official/common wrappers (``{'ema': {'module': sd}}``, ``{'model': sd}``,
    ``{'state_dict': sd}``, ``module.`` prefixes) are unwrapped.

    With ``config`` (preset name, YAML path or RTDETRConfig) the result is validated
    strictly against ``param_spec(config)`` and returned in spec order (see
    :func:`weights_convert.validate`); without it, arrays come back as stored (``dtype``
    then casts floating arrays only).

    ``info``: ``path``, ``format``, ``layout``, ``prefix_stripped``, ``unused_keys``,
    ``num_tensors``, format extras (``checksum`` for Jittor pickles, ``metadata`` for
    safetensors), and ``validation`` (the report) when ``config`` is given.
    """
    path = os.fspath(path)
    raw, found_fmt, extra = read_raw(path, fmt)
    sd, linfo = unwrap(raw, where=path)
    weights = to_numpy(sd)
    del raw, sd
    for k, v in weights.items():
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
            raise WeightsError(f"{path}: '{k}' has dtype {getattr(v, 'dtype', type(v).__name__)}; "
                               f"weights must be numeric arrays")
    info: Dict[str, Any] = {"path": path, "format": found_fmt, **linfo, **extra,
                            "num_tensors": len(weights)}
    if config is not None:
        weights, report = validate(weights, config, drop_mismatched_heads=drop_mismatched_heads, dtype=dtype)
        info["validation"] = report
    elif dtype is not None:
        weights = cast_floats(weights, dtype)
    return weights, info


def cast_floats(weights: Mapping[str, np.ndarray], dtype: str) -> "OrderedDict[str, np.ndarray]":
    if dtype not in ("float32", "float64"):
        raise WeightsError(f"dtype must be float32 or float64, got {dtype!r}")
    return OrderedDict((k, v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in weights.items())


def convert(src: str, dst: str, *, config: Any = None, to: Optional[str] = None,
            drop_mismatched_heads: bool = False, dtype: Optional[str] = None,
            fill_seed: Optional[int] = None) -> Dict[str, Any]:
    """Read ``src``, (validate against ``config``), write ``dst`` atomically.  Returns info
    (the read info plus ``out_format``, ``filled_from_seed``)."""
    weights, info = read_weights(src, config, drop_mismatched_heads=drop_mismatched_heads, dtype=dtype)
    info["filled_from_seed"] = []
    if fill_seed is not None:
        if config is None:
            raise WeightsError("filling from seeded init needs a config")
        from .validate import fill_from_seed
        weights, info["filled_from_seed"] = fill_from_seed(weights, config, fill_seed, dtype)
    info["out_format"] = write_weights(dst, weights, to)
    info["out_tensors"] = len(weights)
    return info
