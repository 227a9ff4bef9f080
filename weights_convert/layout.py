"""Find the state_dict inside a checkpoint object.

Layouts recognised (first match wins, nesting allowed):

* a flat state_dict: a mapping whose values are tensors/arrays;
* official RT-DETR: ``{'ema': {'module': sd, 'updates': n}, 'model': sd, 'last_epoch': ...}``
  — the EMA weights are taken when present (what the official code evaluates with),
  otherwise ``model``;
* common wrappers: ``{'model': sd}``, ``{'state_dict': sd}``, ``{'module': sd}``,
  ``{'model_state_dict': sd}``;
* a ``module.`` prefix on every key (DDP) is stripped.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

from .errors import WeightsError
from .formats import is_tensor

WRAPPER_KEYS = ("ema", "module", "model", "state_dict", "model_state_dict")
PREFIXES = ("module.",)


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    values = list(obj.values())
    return any(is_tensor(v) for v in values) and not any(isinstance(v, Mapping) for v in values)


def unwrap(obj: Any, where: str = "file") -> Tuple["OrderedDict[str, Any]", Dict[str, Any]]:
    """``(state_dict, info)``; info: ``layout`` (e.g. ``'ema.module'``, ``'model'``, ``'flat'``),
    ``prefix_stripped`` (``'module.'`` or None), ``unused_keys`` (other top-level entries)."""
    path: List[str] = []
    unused: List[str] = []
    cur = obj
    for _ in range(8):
        if _is_state_dict(cur):
            break
        if not isinstance(cur, Mapping):
            raise WeightsError(f"{where}: holds a {type(cur).__name__}, expected a state_dict "
                               f"(a mapping of names to tensors)")
        key = next((k for k in WRAPPER_KEYS if isinstance(cur.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(cur)[:8])
            raise WeightsError(f"{where}: no state_dict found (top-level keys: {keys or 'none'}; "
                               f"expected tensors or one of {', '.join(WRAPPER_KEYS)})")
        pre = ".".join(path)
        unused += [f"{pre}.{k}" if pre else str(k) for k in cur if k != key]
        path.append(key)
        cur = cur[key]
    else:
        raise WeightsError(f"{where}: checkpoint nested too deeply ({'.'.join(path)})")
    bad = [(k, type(v).__name__) for k, v in cur.items() if not is_tensor(v)]
    if bad:
        ex = ", ".join(f"{k} ({t})" for k, t in bad[:3])
        raise WeightsError(f"{where}: state_dict{' at ' + '.'.join(path) if path else ''} has "
                           f"{len(bad)} non-tensor entr{'y' if len(bad) == 1 else 'ies'}: {ex}")
    nonstr = [k for k in cur if not isinstance(k, str)]
    if nonstr:
        raise WeightsError(f"{where}: state_dict has non-string keys, e.g. {nonstr[0]!r}")
    sd: "OrderedDict[str, Any]" = OrderedDict(cur.items())
    stripped = None
    for p in PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = OrderedDict((k[len(p):], v) for k, v in sd.items())
            stripped = p
            break
    return sd, {"layout": ".".join(path) or "flat", "prefix_stripped": stripped, "unused_keys": unused}
