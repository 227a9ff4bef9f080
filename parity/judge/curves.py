"""Curve metrics of a parity training run, and their verdict (rules: ``train:`` in thresholds.yaml).

Vocabulary as in ``parity/judge/compare.py``: ``cand`` is the side under test (Jittor), ``base``
the side it is compared with (PyTorch, same dtype) and, in float32 runs, ``ref`` the PyTorch
float64 run (the noise floor: how far float32 rounding alone moves a training run).  Every
relative difference is ``|cand - base| / |base|`` (0 when both are 0, inf when only the base
is 0).  The metrics (:func:`curve_metrics`):

* ``epochs``          per epoch: mean total loss of both sides and every term's mean, their
                      relative differences; ``epoch_total_rel`` / ``epoch_term_rel`` = the
                      worst epoch (and term);
* ``lockstep``        the first iteration at which any loss term or the total differs by more
                      than ``lockstep_rel`` (1e-4) relative; ``length`` = iterations before it
                      (all of them when it never happens).  ``jump`` = how much the largest
                      per-iteration relative difference grew at that iteration: a jump of orders
                      of magnitude is a discrete event (a Hungarian assignment or top-k flip),
                      steady growth is float noise amplified by training;
* ``final_window``    mean of the per-epoch mean total loss over the last ``window`` (5) epochs,
                      relative difference; ``final_window_noise`` = the mean of the per-epoch
                      relative differences over the same epochs (what the window's difference
                      would be if its epochs' signed differences did not cancel);
* ``map``             COCO AP (and AP50, AP75, APs/m/l) of the last evaluated epoch, absolute
                      differences (AP units, 0..1);
* ``first_grad_norm_rel`` relative difference of the pre-clip gradient norm at iteration 1, where
                      both sides hold the same weights and the same batch: the backward passes
                      compared before training amplifies anything;
* ``param_drift``     ||w_cand - w_base|| / ||w_base|| over every trainable parameter of the final
                      weights (per model part too), and ``vs_update`` = ||w_cand - w_base|| /
                      ||w_base - w_init|| (drift relative to how far training moved the weights);
* ``buffer_rel``      worst rel L2 of any state entry outside the trainable parameters (BN running
                      statistics, frozen parameters; integer counters must be equal) at every
                      common checkpoint and at the end (``parity/judge/train_state.py``);
* ``eval_outputs_rel`` worst rel L2 of the eval-mode pred_logits / pred_boxes on the val images at
                      every evaluated epoch (tie flips of the top-k paired, ``parity/judge/outputs_match.py``).

Nothing asked for may be missing: zero compared iterations, fewer compared iterations than
logged, or an mAP / eval output / final state that the plan asked for but a side lacks all
FAIL (``missing`` in the metrics) instead of passing as "not measured".

Verdict (:func:`judge`): a metric passes by the first rule that holds — ``fixed`` (value <=
``max``; for ``lockstep_min``: length >= ``min``) or ``floor`` (float32 with a reference:
value <= k * floor + allowance, floor = the same metric between base and ref).  One exception
(:data:`FLOOR_METRIC`): the floor of ``final_window_rel`` is the reference pair's
``final_window_noise``.  float32 noise moves a run up and down from epoch to epoch, so the
reference pair's own signed window mean can cancel (T32 above T64 in two epochs, below in the
third: measured 8.9e-4 while its epochs differ by 1.1e-3, 2.1e-3 and 6.2e-3) and would fail a
candidate whose epochs are all within their floors.  The candidate's window is still judged
as measured, and every epoch is judged against its own floor by ``epoch_total_rel``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from parity.judge.thresholds import CHECKS, DEFAULT_LOCKSTEP_REL, DEFAULT_WINDOW, TrainRule

MAP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def fnum(x: Any) -> float:
    """A log number (float, or 'nan'/'inf' strings written for non-finite values)."""
    if x is None:
        return math.nan
    return float(x)


def rel(a: float, b: float) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    a, b = fnum(a), fnum(b)
    if math.isnan(a) or math.isnan(b):
        return math.inf if not (math.isnan(a) and math.isnan(b)) else math.nan
    if a == b:
        return 0.0
    if b == 0:
        return math.inf
    return abs(a - b) / abs(b)


def _finite_or_none(x: float) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def complete_epochs(log: Mapping[str, Any]) -> List[Dict[str, Any]]:
    return [e for e in log.get("epochs", []) if e.get("complete", True)]


# ----------------------------------------------------------------------------------------
# the metrics
# ----------------------------------------------------------------------------------------

def iteration_diffs(cand: Mapping[str, Any], base: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Per common iteration: relative difference of the total, of the worst term (and which),
    of the grad norm."""
    out = []
    for rc, rb in zip(cand.get("iterations", []), base.get("iterations", [])):
        if rc["iteration"] != rb["iteration"]:
            break
        names = list(rb["losses"]) + [t for t in rc["losses"] if t not in rb["losses"]]
        # a term on one side only is a real difference (inf); absent on both is no term
        terms = [(t, rel(rc["losses"].get(t), rb["losses"].get(t))) for t in names]
        worst_t, worst = max(terms, key=lambda x: (-1 if math.isnan(x[1]) else x[1]), default=(None, 0.0))
        out.append({"iteration": rb["iteration"], "epoch": rb["epoch"], "total_rel": rel(rc["total"], rb["total"]),
                    "worst_term": worst_t, "worst_term_rel": worst,
                    "grad_norm_rel": rel(rc["grad_norm"], rb["grad_norm"]),
                    "same_batch": rc.get("batch") == rb.get("batch")})
    return out


def lockstep(diffs: Sequence[Dict[str, Any]], tol: float = DEFAULT_LOCKSTEP_REL) -> Dict[str, Any]:
    """First iteration where the total or any term differs by more than ``tol`` relative."""
    prev = 0.0
    for i, d in enumerate(diffs):
        worst = max(d["total_rel"], d["worst_term_rel"]) if not math.isnan(d["worst_term_rel"]) else math.inf
        if worst > tol:
            term = d["worst_term"] if d["worst_term_rel"] >= d["total_rel"] else "total"
            jump = (worst / prev) if prev > 0 else math.inf
            # the step that produced iteration i's weights used iteration i-1's gradients
            g_prev = diffs[i - 1]["grad_norm_rel"] if i > 0 else None
            return {"tolerance": tol, "length": i, "iterations_compared": len(diffs), "first_iteration": d["iteration"],
                    "epoch": d["epoch"], "term": term, "rel": worst, "previous_rel": prev, "jump": jump,
                    "previous_grad_norm_rel": g_prev, "kind": classify_divergence(diffs, i)}
        prev = worst
    return {"tolerance": tol, "length": len(diffs), "iterations_compared": len(diffs), "first_iteration": None,
            "epoch": None, "term": None, "rel": None, "previous_rel": prev, "jump": None, "kind": None}


def classify_divergence(diffs: Sequence[Dict[str, Any]], i: int, grad_tol: float = 1e-3) -> str:
    """Heuristic: ``gradient`` when the previous iteration's pre-clip gradient norms already
    differed by more than ``grad_tol`` while its losses agreed (the backward passes differ);
    ``jump`` when the worst relative difference grew >= 100x in one iteration from a level
    below 1e-5 (a discrete decision flipped, or Adam's first, sign-like steps on gradient
    elements within rounding noise of 0); ``growth`` otherwise (rounding differences
    amplified step by step)."""
    def worst(d):
        return max(d["total_rel"], d["worst_term_rel"])
    cur = worst(diffs[i])
    prev = worst(diffs[i - 1]) if i > 0 else 0.0
    if i > 0 and diffs[i - 1]["grad_norm_rel"] > grad_tol and prev < 1e-4:
        return "gradient"
    if prev < 1e-5 and (prev == 0 or cur / prev >= 100):
        return "jump"
    return "growth"


def epoch_diffs(cand: Mapping[str, Any], base: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Per epoch complete on both sides: mean totals, terms, relative differences."""
    ec = {e["epoch"]: e for e in complete_epochs(cand)}
    out = []
    for eb in complete_epochs(base):
        e = eb["epoch"]
        if e not in ec:
            continue
        c = ec[e]
        names = list(eb["mean"]) + [t for t in c["mean"] if t not in eb["mean"]]
        terms = OrderedDict((t, rel(c["mean"].get(t), eb["mean"].get(t))) for t in names)
        worst_t = max(terms, key=lambda t: terms[t]) if terms else None
        out.append({"epoch": e, "cand_total": fnum(c["mean_total"]), "base_total": fnum(eb["mean_total"]),
                    "total_rel": rel(c["mean_total"], eb["mean_total"]),
                    "cand_terms": OrderedDict((t, fnum(c["mean"].get(t))) for t in names),
                    "base_terms": OrderedDict((t, fnum(eb["mean"].get(t))) for t in names),
                    "term_rel": terms, "worst_term": worst_t, "worst_term_rel": terms[worst_t] if worst_t else 0.0,
                    "grad_norm_rel": rel(c.get("mean_grad_norm"), eb.get("mean_grad_norm"))})
    return out


def final_window(ed: Sequence[Dict[str, Any]], window: int = DEFAULT_WINDOW) -> Dict[str, Any]:
    last = list(ed)[-window:]
    if not last:
        return {"epochs": [], "cand": None, "base": None, "rel": None, "noise": None}
    c = float(np.mean([d["cand_total"] for d in last]))
    b = float(np.mean([d["base_total"] for d in last]))
    return {"epochs": [d["epoch"] for d in last], "cand": c, "base": b, "rel": rel(c, b),
            "noise": float(np.mean([d["total_rel"] for d in last]))}


def map_diff(map_cand: Mapping[int, Mapping[str, float]], map_base: Mapping[int, Mapping[str, float]]) -> Dict[str, Any]:
    """Differences at the last epoch evaluated on both sides (AP units, 0..1)."""
    common = sorted(set(int(k) for k in map_cand) & set(int(k) for k in map_base))
    if not common:
        return {"epoch": None}
    e = common[-1]
    mc, mb = map_cand[e] if e in map_cand else map_cand[str(e)], map_base[e] if e in map_base else map_base[str(e)]
    out: Dict[str, Any] = {"epoch": e, "cand": {k: mc.get(k) for k in MAP_KEYS}, "base": {k: mb.get(k) for k in MAP_KEYS}}
    out["abs"] = {k: abs(float(mc[k]) - float(mb[k])) for k in MAP_KEYS if k in mc and k in mb}
    out["AP_abs"] = out["abs"].get("AP")
    per_epoch = []
    for ep in common:
        a, b = map_cand.get(ep, map_cand.get(str(ep))), map_base.get(ep, map_base.get(str(ep)))
        per_epoch.append({"epoch": ep, "cand_AP": a.get("AP"), "base_AP": b.get("AP"),
                          "abs": abs(float(a["AP"]) - float(b["AP"]))})
    out["per_epoch"] = per_epoch
    return out


def param_drift(w_cand: Mapping[str, np.ndarray], w_base: Mapping[str, np.ndarray], names: Sequence[str],
                w_init: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, Any]:
    """Relative L2 distance of the two sides' final trainable parameters (float64 sums)."""
    parts: Dict[str, List[float]] = OrderedDict()
    tot = [0.0, 0.0, 0.0]
    for n in names:
        a = np.asarray(w_cand[n], dtype=np.float64)
        b = np.asarray(w_base[n], dtype=np.float64)
        d2, b2 = float(np.sum((a - b) ** 2)), float(np.sum(b ** 2))
        u2 = float(np.sum((b - np.asarray(w_init[n], dtype=np.float64)) ** 2)) if w_init is not None else 0.0
        p = parts.setdefault(n.split(".", 1)[0], [0.0, 0.0, 0.0])
        for acc in (p, tot):
            acc[0] += d2
            acc[1] += b2
            acc[2] += u2

    def fin(acc):
        r = {"rel_l2": math.sqrt(acc[0]) / math.sqrt(acc[1]) if acc[1] > 0 else (0.0 if acc[0] == 0 else math.inf),
             "abs_l2": math.sqrt(acc[0])}
        if w_init is not None:
            r["update_l2"] = math.sqrt(acc[2])
            r["vs_update"] = math.sqrt(acc[0]) / math.sqrt(acc[2]) if acc[2] > 0 else (0.0 if acc[0] == 0 else math.inf)
        return r
    out = fin(tot)
    out["parts"] = OrderedDict((k, fin(v)) for k, v in parts.items())
    out["n_params"] = len(names)
    return out


def curve_metrics(cand: Mapping[str, Any], base: Mapping[str, Any], *, map_cand=None, map_base=None,
                  w_cand=None, w_base=None, w_init=None, names: Sequence[str] = (),
                  buffers: Optional[Mapping[str, Any]] = None, eval_outputs: Optional[Mapping[str, Any]] = None,
                  expect_evals: Sequence[int] = (), expect_final: bool = False,
                  labels: Sequence[str] = ("cand", "base"),
                  lockstep_rel: float = DEFAULT_LOCKSTEP_REL, window: int = DEFAULT_WINDOW) -> Dict[str, Any]:
    """Every curve metric of ``cand`` against ``base`` (two worker logs, see the module docstring).

    ``buffers`` / ``eval_outputs``: the comparisons of ``parity/judge/train_state.py``.  ``expect_evals``
    (epochs the plan evaluated on both sides) and ``expect_final`` (both sides completed) say
    what must be there: a check whose data is missing then fails (``missing``) instead of
    passing as not measured."""
    idiffs = iteration_diffs(cand, base)
    ed = epoch_diffs(cand, base)
    worst_total = max(ed, key=lambda d: d["total_rel"], default=None)
    worst_term = max(ed, key=lambda d: d["worst_term_rel"], default=None)
    m: Dict[str, Any] = {
        "iterations": idiffs,
        "epochs": ed,
        "lockstep": lockstep(idiffs, lockstep_rel),
        "epoch_total_rel": worst_total["total_rel"] if worst_total else None,
        "epoch_total_rel_at": worst_total["epoch"] if worst_total else None,
        "epoch_term_rel": worst_term["worst_term_rel"] if worst_term else None,
        "epoch_term_rel_at": {"epoch": worst_term["epoch"], "term": worst_term["worst_term"]} if worst_term else None,
        "final_window": final_window(ed, window),
        "same_inputs": all(d["same_batch"] for d in idiffs),
    }
    m["final_window_rel"] = m["final_window"]["rel"]
    m["final_window_noise"] = m["final_window"]["noise"]
    if map_cand is not None and map_base is not None:
        m["map"] = map_diff(map_cand, map_base)
        m["map_abs"] = m["map"].get("AP_abs")
    else:
        m["map"], m["map_abs"] = None, None
    if w_cand is not None and w_base is not None:
        m["drift"] = param_drift(w_cand, w_base, names, w_init)
        m["param_drift"] = m["drift"]["rel_l2"]
    else:
        m["drift"], m["param_drift"] = None, None
    m["lockstep"]["iterations_logged"] = max(len(cand.get("iterations", [])), len(base.get("iterations", [])))
    m["buffers"] = dict(buffers) if buffers else None
    m["buffer_rel"] = buffers["worst"] if buffers else None
    m["eval_outputs"] = dict(eval_outputs) if eval_outputs else None
    m["eval_outputs_rel"] = eval_outputs["worst"] if eval_outputs else None
    m["missing"] = missing_data(m, map_cand, map_base, expect_evals, expect_final, labels)
    for c in m["missing"]:
        m[c] = None                     # judged as missing, never on partial data
    m["lockstep_min"] = m["lockstep"]["length"]
    # iteration 1: identical weights and inputs on both sides, so the pre-clip gradient norm
    # compares the backward passes before any training chaos (later norms amplify differences)
    m["first_grad_norm_rel"] = idiffs[0]["grad_norm_rel"] if idiffs and idiffs[0]["same_batch"] else None
    return m


def missing_data(m: Mapping[str, Any], map_cand, map_base, expect_evals: Sequence[int], expect_final: bool,
                 labels: Sequence[str]) -> Dict[str, str]:
    """check -> why its data is missing, for data the plan asked for (see :func:`curve_metrics`)."""
    out: Dict[str, str] = {}
    want = sorted(int(e) for e in expect_evals)
    if want:
        for lab, mp in zip(labels, (map_cand, map_base)):
            have = {int(k) for k in (mp or {})}
            gone = [e for e in want if e not in have]
            if gone:
                out["map_abs"] = f"mAP of epoch(s) {gone} missing on {lab} (the plan evaluated them)"
                break
        got = {int(p["epoch"]) for p in ((m.get("eval_outputs") or {}).get("epochs") or [])}
        gone = [e for e in want if e not in got]
        if gone:
            out["eval_outputs_rel"] = f"eval outputs of epoch(s) {gone} not on both sides (the plan evaluated them)"
    if expect_final:
        if m.get("param_drift") is None:
            out["param_drift"] = f"final weights missing on {labels[0]} or {labels[1]} (both completed)"
        pts = [p["point"] for p in ((m.get("buffers") or {}).get("points") or [])]
        if "final" not in pts:
            out["buffer_rel"] = f"final buffers missing on {labels[0]} or {labels[1]} (both completed)"
    return out


CHECK_TEXT = {
    "first_grad_norm_rel": "relative difference of the pre-clip gradient norm at iteration 1 (same weights, same batch)",
    "epoch_total_rel": "worst per-epoch relative difference of the mean total loss",
    "epoch_term_rel": "worst per-epoch relative difference of any loss term's mean",
    "final_window_rel": "relative difference of the mean total loss over the final window",
    "map_abs": "absolute AP difference at the last evaluation (AP units)",
    "param_drift": "relative L2 distance of the final trainable parameters",
    "buffer_rel": "worst relative L2 of any buffer (BN running statistics; counters exact) at checkpoints and the end",
    "eval_outputs_rel": "worst relative L2 of the eval-mode pred_logits/pred_boxes on the val images (every eval)",
    "lockstep_min": "iterations in lock-step (every term within the lock-step tolerance)",
}


# check -> the metric of the floor pair that is its floor, where that is not the check itself
# (see the module docstring: a signed window mean of pure noise can cancel)
FLOOR_METRIC = {"final_window_rel": "final_window_noise"}


def judge(metrics: Mapping[str, Any], rules: Mapping[str, TrainRule],
          floor: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """One entry per check: value, floor (base vs ref), rule that held, passed."""
    out = []
    for c in CHECKS:
        r = rules[c]
        v = metrics.get(c)
        fl = floor.get(FLOOR_METRIC.get(c, c)) if floor is not None else None
        e: Dict[str, Any] = {"check": c, "text": CHECK_TEXT[c], "value": v, "floor": fl, "threshold": r.to_dict(),
                             "rule": None, "passed": False}
        miss = (metrics.get("missing") or {}).get(c)
        if miss:
            e["reason"] = f"missing: {miss}"
            out.append(e)
            continue
        if v is None:
            e.update(passed=True, rule="n/a", reason="not measured in this run")
            out.append(e)
            continue
        v = float(v)
        if c == "lockstep_min":
            ls = metrics.get("lockstep", {})
            n = int(ls.get("iterations_compared", 0))
            logged = int(ls.get("iterations_logged", n))
            need = min(r.min, float(n))
            if n == 0:
                # min(min, 0) = 0 would pass: nothing compared proves nothing
                e["reason"] = "no iteration compared (no common iteration in the two logs)"
            elif n < logged:
                e["reason"] = (f"only {n} of {logged} logged iterations compared (iteration numbers "
                               f"diverge or a side logged fewer)")
            elif v >= need:
                e.update(passed=True, rule="fixed")
            else:
                e["reason"] = f"only {int(v)} iteration(s) in lock-step, need {int(need)}"
            out.append(e)
            continue
        if math.isnan(v):
            e["reason"] = "not a number (a side has non-finite losses)"
        elif r.max is not None and v <= r.max:
            e.update(passed=True, rule="fixed")
        elif r.k is not None and fl is not None and math.isfinite(float(fl)) and v <= r.k * float(fl) + r.allowance:
            e.update(passed=True, rule="floor", bound=r.k * float(fl) + r.allowance)
        else:
            bound = f"max {r.max:.3g}"
            if r.k is not None and fl is not None:
                bound += f" or {r.k:g} x floor {float(fl):.3g} + {r.allowance:.3g}"
            e["reason"] = f"{v:.3g} above {bound}{_where(c, metrics)}"
        out.append(e)
    return out


def _where(check: str, metrics: Mapping[str, Any]) -> str:
    """Where a failing buffer / eval-output error sits (for the one-line reason)."""
    if check == "buffer_rel" and metrics.get("buffers"):
        w = metrics["buffers"].get("worst_at") or {}
        return f" (worst {w.get('tensor')} at {w.get('point')})"
    if check == "eval_outputs_rel" and metrics.get("eval_outputs"):
        return f" (epoch {metrics['eval_outputs'].get('worst_at')})"
    return ""
