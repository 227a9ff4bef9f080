"""Check a name -> array dict against ``param_spec(config)`` (the official state_dict contract).

Every problem (missing keys, unexpected keys, shape and dtype mismatches) is gathered and
raised together in one :class:`WeightsError`.  Handled explicitly, and reported:

* ``num_batches_tracked``: a missing one (Jittor has none) is filled with int64 0; an
  extra one on a FrozenBatchNorm2d (the spec has none there; checkpoints trained with
  plain BN carry it) is dropped;
* integer buffers saved as int32 (Jittor) become int64; floating tensors become float32
  (or ``dtype``) — a narrowing cast (float64 -> float32) is reported;
* ``drop_mismatched_heads=True``: class-dependent heads whose shape differs (another
  ``num_classes``) are dropped and listed; :func:`fill_from_seed` fills them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from rtdetr_core.config import RTDETRConfig, available_presets, load_config
from rtdetr_core.param_spec import ParamEntry, param_spec

from .errors import WeightsError

CLASS_HEAD_PREFIXES = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")
NBT = "num_batches_tracked"
SHOW = 3          # names shown per problem kind


def is_class_head(name: str) -> bool:
    return name.startswith(CLASS_HEAD_PREFIXES)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(s)) for s in shape) + "]"


def _listing(label: str, items: List[str]) -> str:
    shown = ", ".join(items[:SHOW])
    more = f", ... (+{len(items) - SHOW} more)" if len(items) > SHOW else ""
    return f"{len(items)} {label}: {shown}{more}"


def _frozen_bn_prefixes(entries: List[ParamEntry]) -> set:
    """Prefixes ``p`` of FrozenBatchNorm2d modules: ``p.weight`` is a buffer with a ``p.running_mean``."""
    names = {e.name: e for e in entries}
    out = set()
    for e in entries:
        if e.name.endswith(".running_mean"):
            p = e.name[: -len(".running_mean")]
            w = names.get(p + ".weight")
            if w is not None and w.kind == "buffer":
                out.add(p)
    return out


def _num_classes_of(weights: Mapping[str, Any]) -> Optional[int]:
    w = weights.get("decoder.enc_score_head.weight")
    return int(np.shape(w)[0]) if w is not None and np.ndim(w) == 2 else None


def _matching_presets(weights: Mapping[str, Any], exclude: str) -> List[str]:
    """Presets whose spec has exactly the file's names and shapes (num_batches_tracked aside)."""
    have = {(k, tuple(np.shape(v))) for k, v in weights.items() if not k.endswith(NBT)}
    found = []
    for name in available_presets():
        if name == exclude:
            continue
        try:
            want = {(e.name, e.shape) for e in param_spec(name) if not e.name.endswith(NBT)}
        except Exception:      # a broken preset must not hide the real error
            continue
        if want == have:
            found.append(name)
    return sorted(found, key=lambda n: (len(n), n))      # plain official names first


def validate(weights: Mapping[str, Any], config: Any, *, drop_mismatched_heads: bool = False,
             dtype: Optional[str] = None) -> Tuple["OrderedDict[str, np.ndarray]", Dict[str, Any]]:
    """Strict check of ``weights`` against ``param_spec(config)``.

    Returns ``(weights in spec order, report)``; ``report`` holds lists
    ``filled_num_batches_tracked``, ``dropped_num_batches_tracked``, ``dropped_heads``,
    ``cast`` (``"name: from -> to"``, grouped in ``cast_summary``) plus ``config``.
    ``dtype`` (``float32``/``float64``) is the floating dtype of the result (default
    ``float32``, the spec's); int64 buffers stay int64.
    Raises :class:`WeightsError` listing every problem at once.
    """
    cfg: RTDETRConfig = load_config(config)
    if dtype not in (None, "float32", "float64"):
        raise WeightsError(f"dtype must be float32 or float64, got {dtype!r}")
    fdt = np.dtype(dtype or "float32")
    entries = param_spec(cfg)
    spec = {e.name: e for e in entries}
    frozen = _frozen_bn_prefixes(entries)

    missing: List[str] = []
    unexpected: List[str] = []
    shape_bad: List[str] = []
    dtype_bad: List[str] = []
    head_shape: List[str] = []
    report: Dict[str, Any] = {"config": cfg.name, "filled_num_batches_tracked": [],
                              "dropped_num_batches_tracked": [], "dropped_heads": [], "cast": [],
                              "reshaped": []}

    for k in weights:
        if k in spec:
            continue
        if k.endswith("." + NBT) and k[: -len(NBT) - 1] in frozen:
            report["dropped_num_batches_tracked"].append(k)
        else:
            unexpected.append(k)

    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    casts: Dict[str, int] = {}
    for e in entries:
        if e.name not in weights:
            if e.name.endswith("." + NBT):
                out[e.name] = np.zeros(e.shape, dtype=np.int64)
                report["filled_num_batches_tracked"].append(e.name)
            else:
                missing.append(e.name)
            continue
        a = np.asarray(weights[e.name])
        if tuple(a.shape) != e.shape:
            if e.dtype == "int64" and a.size == 1 and a.dtype.kind in "iu":
                report["reshaped"].append(f"{e.name}: {_fmt_shape(a.shape)} -> {_fmt_shape(e.shape)}")
                a = a.reshape(e.shape)     # a Jittor-made scalar has shape [1]
            else:
                item = f"{e.name} (file {_fmt_shape(a.shape)}, spec {_fmt_shape(e.shape)})"
                if is_class_head(e.name):
                    head_shape.append(item)
                    if drop_mismatched_heads:
                        report["dropped_heads"].append(e.name)
                        continue
                shape_bad.append(item)
                continue
        want = np.dtype(np.int64) if e.dtype == "int64" else fdt
        ok_kind = "iu" if e.dtype == "int64" else "f"
        if a.dtype.kind not in ok_kind:
            dtype_bad.append(f"{e.name} ({a.dtype}, spec {e.dtype})")
            continue
        if a.dtype != want:
            report["cast"].append(f"{e.name}: {a.dtype} -> {want}")
            casts[f"{a.dtype} -> {want}"] = casts.get(f"{a.dtype} -> {want}", 0) + 1
            a = a.astype(want)
        out[e.name] = a
    report["cast_summary"] = casts

    if missing or unexpected or shape_bad or dtype_bad:
        parts = []
        if missing:
            parts.append(_listing("missing", missing))
        if unexpected:
            parts.append(_listing("unexpected", unexpected))
        if shape_bad:
            parts.append(_listing("shape mismatch" + ("es" if len(shape_bad) > 1 else ""), shape_bad))
        if dtype_bad:
            parts.append(_listing("dtype mismatch" + ("es" if len(dtype_bad) > 1 else ""), dtype_bad))
        hint = ""
        if not missing and not unexpected and not dtype_bad and shape_bad and len(head_shape) == len(shape_bad):
            nc = _num_classes_of(weights)
            hint = (f"; only the class-dependent heads differ (file has {nc} classes, config "
                    f"{cfg.num_classes}): pass --drop-mismatched-heads (drop_mismatched_heads=True) to fine-tune")
        else:
            other = _matching_presets(weights, cfg.name)
            if other:
                names = " / ".join(f"'{o}'" for o in other)
                hint = f"; the file matches preset {names}: is --config right?"
        raise WeightsError(f"weights do not match config '{cfg.name}' ({len(weights)} tensors given, "
                           f"{len(entries)} in spec): " + "; ".join(parts) + hint)
    return out, report


def fill_from_seed(weights: Mapping[str, np.ndarray], config: Any, seed: int = 3,
                   dtype: Optional[str] = None) -> Tuple["OrderedDict[str, np.ndarray]", List[str]]:
    """Complete ``weights`` (e.g. after ``drop_mismatched_heads``) with
    ``rtdetr_core.init.seeded_weights(config, seed)`` for the entries it lacks.
    Returns ``(weights in spec order, names filled)``."""
    from rtdetr_core.init import seeded_weights

    cfg = load_config(config)
    entries = param_spec(cfg)
    lacking = [e.name for e in entries if e.name not in weights]
    if not lacking:
        return OrderedDict((e.name, weights[e.name]) for e in entries), []
    seeded = seeded_weights(entries, seed)
    fdt = np.dtype(dtype or "float32")
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for e in entries:
        if e.name in weights:
            out[e.name] = weights[e.name]
        else:
            v = seeded[e.name]
            out[e.name] = v.astype(fdt) if v.dtype.kind == "f" else v
    return out, lacking


def summarize_report(report: Mapping[str, Any]) -> List[str]:
    """Human lines for what validate did (empty when it changed nothing)."""
    lines = []
    for key, text in (("filled_num_batches_tracked", "filled missing num_batches_tracked with int64 0"),
                      ("dropped_num_batches_tracked", "dropped num_batches_tracked of FrozenBatchNorm2d layers"),
                      ("dropped_heads", "dropped class-dependent heads with another shape")):
        items = report.get(key) or []
        if items:
            lines.append(_listing(text, list(items)).replace(f"{len(items)} {text}", f"{text}: {len(items)}", 1))
    if report.get("reshaped"):
        lines.append(f"reshaped {len(report['reshaped'])} size-1 integer buffer(s) to the spec's scalar shape")
    for what, n in (report.get("cast_summary") or {}).items():
        lines.append(f"cast {n} tensor{'s' if n != 1 else ''} {what}")
    return lines
