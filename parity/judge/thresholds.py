"""Loader of ``thresholds.yaml``: stage -> dtype -> tensor group -> :class:`GroupThreshold`.

The file's comments hold the reasoning behind every number; this module only parses and
validates it (unknown keys, wrong types and missing groups are one-line errors naming the
file and the key).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import yaml

from parity.facts import PARITY_DIR


DEFAULT_PATH = os.path.join(PARITY_DIR, "thresholds.yaml")    # where users and reports name it
STAGES = ("forward", "grad")
DTYPES = ("float32", "float64")
GROUPS = {
    "forward": ("intermediates", "outputs", "train_intermediates", "train_outputs", "train_buffers"),
    "grad": ("intermediates", "outputs", "losses", "grads", "step"),
}
_KEYS = ("rel_l2", "cos", "atol", "zero_ref", "k", "allowance", "cap", "cos_ref")
OTHER_SECTIONS = {"eval", "detect", "train", "bench"}   # parsed elsewhere (see load_thresholds)


class ThresholdError(ValueError):
    """A problem in a thresholds file (one line, names the file and the key)."""


@dataclass(frozen=True)
class GroupThreshold:
    rel_l2: float                 # fixed rule bound on rel L2 (cand vs base)
    cos: Optional[float] = None   # cosine floor that goes with the fixed rule
    atol: Optional[float] = None  # absolute rule bound on max |cand - base|
    k: Optional[float] = None     # noise-floor ratio bound (float32 with a float64 reference)
    allowance: float = 0.0        # absolute slack of the floor rule (rel-L2 units)
    zero_ref: Optional[float] = None    # the abs rule applies only where max|reference| <= this
    cap: Optional[float] = None   # floor rule: err vs float64 must also be <= cap (absolute, rel-L2 units)
    cos_ref: Optional[float] = None  # floor rule: cosine vs the float64 reference must be >= this

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Thresholds:
    path: str
    table: Dict[str, Dict[str, Dict[str, GroupThreshold]]]
    min_agreement: float = 1.0
    tie_k: float = 4.0                 # a flip is a tie when its exact gap <= tie_k x float32 noise
    float64_noise_rel: float = 1.0e-12  # float64 comparisons: noise = this x max|score|

    def get(self, stage: str, dtype: str, group: str) -> GroupThreshold:
        try:
            return self.table[stage][dtype][group]
        except KeyError:
            raise ThresholdError(f"{self.path}: no threshold for {stage}.{dtype}.{group}") from None

    def for_run(self, stage: str, dtype: str) -> Dict[str, GroupThreshold]:
        return dict(self.table[stage][dtype])


def _num(path: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ThresholdError(f"{path}: key '{key}': expected a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise ThresholdError(f"{path}: key '{key}': expected a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0:
        raise ThresholdError(f"{path}: key '{key}': must be a finite number >= 0, got {v!r}")
    return f


def load_thresholds(path: Optional[str] = None) -> Thresholds:
    """Parse and validate a thresholds file (default: the bundled ``parity/thresholds.yaml``)."""
    path = path or DEFAULT_PATH
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ThresholdError(f"{path}: thresholds file not found") from None
    except yaml.YAMLError as e:
        raise ThresholdError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ThresholdError(f"{path}: top level must be a mapping")
    # sections parsed by their own modules: eval/detect (parity/detmatch.py), train, bench
    allowed = set(STAGES) | {"defaults", "decisions"} | OTHER_SECTIONS
    for k in data:
        if k not in allowed:
            raise ThresholdError(f"{path}: key '{k}': unknown (allowed: {', '.join(sorted(allowed))})")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ThresholdError(f"{path}: key 'defaults': expected a mapping")
    for k in defaults:
        if k not in ("k", "allowance"):
            raise ThresholdError(f"{path}: key 'defaults.{k}': unknown (allowed: k, allowance)")
    dk = _num(path, "defaults.k", defaults["k"]) if "k" in defaults else None
    dallow = _num(path, "defaults.allowance", defaults.get("allowance", 0.0))

    table: Dict[str, Dict[str, Dict[str, GroupThreshold]]] = {}
    for stage in STAGES:
        sd = data.get(stage)
        if not isinstance(sd, dict):
            raise ThresholdError(f"{path}: key '{stage}': missing or not a mapping")
        table[stage] = {}
        for k in sd:
            if k not in DTYPES:
                raise ThresholdError(f"{path}: key '{stage}.{k}': unknown dtype (allowed: float32, float64)")
        for dtype in DTYPES:
            dd = sd.get(dtype)
            if not isinstance(dd, dict):
                raise ThresholdError(f"{path}: key '{stage}.{dtype}': missing or not a mapping")
            table[stage][dtype] = {}
            for g in dd:
                if g not in GROUPS[stage]:
                    raise ThresholdError(f"{path}: key '{stage}.{dtype}.{g}': unknown group "
                                         f"(allowed: {', '.join(GROUPS[stage])})")
            for g in GROUPS[stage]:
                where = f"{stage}.{dtype}.{g}"
                gd = dd.get(g)
                if not isinstance(gd, dict):
                    raise ThresholdError(f"{path}: key '{where}': missing or not a mapping")
                for k in gd:
                    if k not in _KEYS:
                        raise ThresholdError(f"{path}: key '{where}.{k}': unknown (allowed: {', '.join(_KEYS)})")
                if "rel_l2" not in gd:
                    raise ThresholdError(f"{path}: key '{where}.rel_l2': required")
                vals = {k: _num(path, f"{where}.{k}", v) for k, v in gd.items()}
                if "cos" in vals and vals["cos"] > 1:
                    raise ThresholdError(f"{path}: key '{where}.cos': must be <= 1, got {vals['cos']}")
                k = vals.get("k", dk if dtype == "float32" else None)
                table[stage][dtype][g] = GroupThreshold(
                    rel_l2=vals["rel_l2"], cos=vals.get("cos"), atol=vals.get("atol"), k=k,
                    allowance=vals.get("allowance", dallow), zero_ref=vals.get("zero_ref"),
                    cap=vals.get("cap"), cos_ref=vals.get("cos_ref"))
    dec = data.get("decisions") or {}
    allowed_dec = ("min_agreement", "tie_k", "float64_noise_rel")
    if not isinstance(dec, dict) or any(k not in allowed_dec for k in dec):
        bad = next((k for k in dec if k not in allowed_dec), "decisions") if isinstance(dec, dict) else "decisions"
        raise ThresholdError(f"{path}: key 'decisions.{bad}': unknown (allowed: {', '.join(allowed_dec)})")
    ma = _num(path, "decisions.min_agreement", dec.get("min_agreement", 1.0))
    if ma > 1:
        raise ThresholdError(f"{path}: key 'decisions.min_agreement': must be <= 1")
    return Thresholds(path=path, table=table, min_agreement=ma,
                      tie_k=_num(path, "decisions.tie_k", dec.get("tie_k", 4.0)),
                      float64_noise_rel=_num(path, "decisions.float64_noise_rel",
                                             dec.get("float64_noise_rel", 1.0e-12)))
