"""The one loader of ``thresholds.yaml`` (``load_thresholds``), every section:

* ``forward`` / ``grad``: stage -> dtype -> tensor group -> :class:`GroupThreshold`, and
  ``decisions`` (parsed on load, as every run needs them);
* ``eval`` / ``detect``: flat numbers with defaults (``Thresholds.section(name)``);
* ``train``: the curve checks' rules (``Thresholds.train()`` -> :class:`TrainThresholds`).

The file is read once; a section is validated when it is first asked for, so a stage never
fails on a section it does not use.  The file's comments hold the reasoning behind every
number; this module only parses and validates it (unknown keys, wrong types and missing
groups are one-line errors naming the file and the key).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
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
OTHER_SECTIONS = {"eval", "detect", "train", "bench", "ranks"}   # parsed on demand (Thresholds.section / .train)
# defaults (used when thresholds.yaml has no such key); the YAML holds the reasoning
SECTION_DEFAULTS: Dict[str, Dict[str, float]] = {
    "detect": {"match_iou": 0.5, "min_agreement": 0.9},
    "ranks": {"loss_rel": 1e-12, "grad_rel": 1e-11, "step_rel": 1e-11, "grad_floor": 1e-3},
    "eval": {"max_ap_diff": 0.002, "match_iou": 0.5, "score_threshold": 0.3, "min_mean_agreement": 0.0,
             "max_tie_rows": 4},
}


# the train section (parity/judge/curves.py computes and judges these checks)
DEFAULT_LOCKSTEP_REL = 1e-4
DEFAULT_WINDOW = 5
CHECKS = ("first_grad_norm_rel", "epoch_total_rel", "epoch_term_rel", "final_window_rel", "map_abs", "param_drift",
          "buffer_rel", "eval_outputs_rel", "lockstep_min")
_RULE_KEYS = {"max", "min", "k", "allowance"}


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
    data: Dict[str, Any] = field(default_factory=dict, repr=False)    # the file, for the other sections

    def get(self, stage: str, dtype: str, group: str) -> GroupThreshold:
        try:
            return self.table[stage][dtype][group]
        except KeyError:
            raise ThresholdError(f"{self.path}: no threshold for {stage}.{dtype}.{group}") from None

    def for_run(self, stage: str, dtype: str) -> Dict[str, GroupThreshold]:
        return dict(self.table[stage][dtype])

    def section(self, name: str) -> Dict[str, float]:
        """The ``detect`` / ``eval`` section: every key a number >= 0, defaults for the rest."""
        return _flat_section(self.path, self.data, name)

    def train(self) -> "TrainThresholds":
        """The ``train`` section (required when asked for), with the decisions' tie_k."""
        t = _train_section(self.path, self.data)
        t.tie_k = self.tie_k
        return t


def _num(path: str, key: str, v: Any, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ThresholdError(f"{path}: key '{key}': expected a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise ThresholdError(f"{path}: key '{key}': expected a number, got {v!r}") from None
    if not math.isfinite(f) or f < lo:
        raise ThresholdError(f"{path}: key '{key}': must be a finite number >= {lo:g}, got {v!r}")
    return f


def _mapping(path: str, where: str, v: Any) -> Dict[str, Any]:
    if not isinstance(v, dict):
        raise ThresholdError(f"{path}: key '{where}': missing or not a mapping")
    return v


def _known(path: str, where: str, d: Dict[str, Any], allowed, noun: str = "") -> None:
    for k in d:
        if k not in allowed:
            raise ThresholdError(f"{path}: key '{where}.{k}': unknown{' ' + noun if noun else ''} "
                                 f"(allowed: {', '.join(allowed)})")


def _read(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ThresholdError(f"{path}: thresholds file not found") from None
    except yaml.YAMLError as e:
        raise ThresholdError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None


def load_thresholds(path: Optional[str] = None, stage_tables: bool = True) -> Thresholds:
    """Parse and validate a thresholds file (default: the bundled ``parity/thresholds.yaml``).
    ``stage_tables=False`` (the train stage): leave the forward/grad tables out; only the
    sections asked for later are validated."""
    path = path or DEFAULT_PATH
    data = _read(path)
    if not stage_tables:
        return Thresholds(path=path, table={}, data=data if isinstance(data, dict) else {})
    if not isinstance(data, dict):
        raise ThresholdError(f"{path}: top level must be a mapping")
    # eval/detect/train are parsed when asked for (Thresholds.section, Thresholds.train)
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
        sd = _mapping(path, stage, data.get(stage))
        table[stage] = {}
        _known(path, stage, sd, DTYPES, "dtype")
        for dtype in DTYPES:
            dd = _mapping(path, f"{stage}.{dtype}", sd.get(dtype))
            table[stage][dtype] = {}
            _known(path, f"{stage}.{dtype}", dd, GROUPS[stage], "group")
            for g in GROUPS[stage]:
                where = f"{stage}.{dtype}.{g}"
                gd = _mapping(path, where, dd.get(g))
                _known(path, where, gd, _KEYS)
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
    return Thresholds(path=path, table=table, min_agreement=ma, data=data,
                      tie_k=_num(path, "decisions.tie_k", dec.get("tie_k", 4.0)),
                      float64_noise_rel=_num(path, "decisions.float64_noise_rel",
                                             dec.get("float64_noise_rel", 1.0e-12)))


def _flat_section(path: str, data: Any, name: str) -> Dict[str, float]:
    defaults = SECTION_DEFAULTS[name]
    sec = data.get(name) if isinstance(data, dict) else None
    if sec is None:
        return dict(defaults)
    if not isinstance(sec, dict):
        raise ThresholdError(f"{path}: key '{name}': expected a mapping")
    out = dict(defaults)
    for k, v in sec.items():
        if k not in defaults:
            raise ThresholdError(f"{path}: key '{name}.{k}': unknown (allowed: {', '.join(defaults)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or v < 0:
            raise ThresholdError(f"{path}: key '{name}.{k}': must be a finite number >= 0, got {v!r}")
        out[k] = float(v)
    return out


@dataclass(frozen=True)
class TrainRule:
    max: Optional[float] = None          # fixed rule: value <= max
    min: Optional[float] = None          # fixed rule for lengths: value >= min
    k: Optional[float] = None            # floor rule: value <= k * floor + allowance
    allowance: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainThresholds:
    path: str
    lockstep_rel: float
    window: int
    table: Dict[str, Dict[str, TrainRule]]      # dtype -> check -> rule
    tie_k: float = 4.0                          # decisions: a tie when its gap <= tie_k x noise

    def for_dtype(self, dtype: str) -> Dict[str, TrainRule]:
        return self.table[dtype]


def _train_section(path: str, data: Any) -> TrainThresholds:
    """Parse ``train:`` of a thresholds file; problems raise ``ThresholdError`` (one line)."""
    sec = _mapping(path, "train", data.get("train") if isinstance(data, dict) else None)
    _known(path, "train", sec, ("lockstep_rel", "final_window", "float32", "float64"))
    lockstep_rel = _num(path, "train.lockstep_rel", sec.get("lockstep_rel", DEFAULT_LOCKSTEP_REL))
    window = int(_num(path, "train.final_window", sec.get("final_window", DEFAULT_WINDOW), 1))
    table: Dict[str, Dict[str, TrainRule]] = {}
    for dt in ("float32", "float64"):
        dd = _mapping(path, f"train.{dt}", sec.get(dt))
        table[dt] = {}
        _known(path, f"train.{dt}", dd, CHECKS, "check")
        for c in CHECKS:
            where = f"train.{dt}.{c}"
            r = _mapping(path, where, dd.get(c))
            _known(path, where, r, sorted(_RULE_KEYS))
            if c == "lockstep_min":
                if "min" not in r:
                    raise ThresholdError(f"{path}: key '{where}.min': required")
            elif "max" not in r:
                raise ThresholdError(f"{path}: key '{where}.max': required")
            table[dt][c] = TrainRule(max=_num(path, f"{where}.max", r["max"]) if "max" in r else None,
                                     min=_num(path, f"{where}.min", r["min"]) if "min" in r else None,
                                     k=_num(path, f"{where}.k", r["k"]) if "k" in r else None,
                                     allowance=_num(path, f"{where}.allowance", r.get("allowance", 0.0)))
    return TrainThresholds(path=os.path.abspath(path), lockstep_rel=lockstep_rel, window=window, table=table)
