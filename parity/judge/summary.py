"""The entries of a run's comparisons (parity/judge/compare.py) summed up: the module a
parameter belongs to, how bad an entry is, per-module and per-group summaries, and the
first divergence in forward order."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence


def module_of(param: str) -> str:
    """The module a parameter belongs to, at the granularity of the named intermediates:
    up to and including the first numeric path component (``backbone.res_layers.1``,
    ``encoder.fpn_blocks.0``, ``decoder.decoder.layers.3``, ``decoder.dec_bbox_head.5``);
    without a numeric component, the owner module (``decoder.denoising_class_embed``)."""
    parts = param.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit() and i >= 1:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or param


def severity(e: Dict[str, Any]) -> float:
    """Sort key "worst first": failing before passing, then the error relative to its bound."""
    if e.get("kind") != "tensor":
        return (0 if e["passed"] else 1e300) + (1.0 - float(e.get("agreement", 1.0)))
    th = e.get("threshold", {})
    over = e["err"] / th["rel_l2"] if th.get("rel_l2") else e["err"]
    if "ratio" in e and th.get("k"):
        over = min(over, e["ratio"] / th["k"])
    if not e["passed"]:
        over += 1e150
    return over if math.isfinite(over) else 1e300


def by_module(entries: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Entries grouped by module, worst module first; each with its worst tensor."""
    mods: Dict[str, Dict[str, Any]] = {}
    for e in entries:
        m = mods.setdefault(e["module"], {"module": e["module"], "n": 0, "failed": 0, "worst": None,
                                          "max_err": 0.0, "max_ratio": None})
        m["n"] += 1
        m["failed"] += 0 if e["passed"] else 1
        if m["worst"] is None or severity(e) > severity(m["worst"]):
            m["worst"] = e
        if e.get("kind") == "tensor":
            m["max_err"] = max(m["max_err"], e["err"])
            if "ratio" in e:
                m["max_ratio"] = e["ratio"] if m["max_ratio"] is None else max(m["max_ratio"], e["ratio"])
    out = sorted(mods.values(), key=lambda m: severity(m["worst"]), reverse=True)
    for m in out:
        w = m.pop("worst")
        m["worst_name"] = w["name"]
        m["worst_err"] = w.get("err")
        m["worst_ratio"] = w.get("ratio")
    return out


def group_summary(entries: Sequence[Dict[str, Any]], groups: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for g in groups:
        es = [e for e in entries if e["group"] == g]
        if not es:
            continue
        tens = [e for e in es if e.get("kind") == "tensor"]
        worst = max(es, key=severity)
        rules: Dict[str, int] = {}
        for e in es:
            key = e["rule"] or "FAIL"
            rules[key] = rules.get(key, 0) + 1
        s: Dict[str, Any] = {"n": len(es), "failed": sum(1 for e in es if not e["passed"]), "rules": rules,
                             "worst": worst["name"], "worst_err": worst.get("err"),
                             "worst_agreement": worst.get("agreement")}
        if tens:
            s["max_err"] = max(e["err"] for e in tens)
            s["max_max_rel"] = max(e["errors"]["cand_base"]["max_rel"] for e in tens)
            s["min_cos"] = min(e["cos"] for e in tens)
            if any("floor" in e for e in tens):
                s["max_floor"] = max(e.get("floor", 0.0) for e in tens)
                s["max_err_ref"] = max(e.get("err_ref", 0.0) for e in tens)
                s["max_ratio"] = max(e.get("ratio", 0.0) for e in tens)
                s["worst"] = worst["name"]
                s["worst_floor"] = worst.get("floor")
                s["worst_err_ref"] = worst.get("err_ref")
                s["worst_ratio"] = worst.get("ratio")
        out[g] = s
    return out


def first_divergence(entries: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The first failing entry in the given (forward) order, the last passing one before it
    and the largest error upstream of it."""
    for i, e in enumerate(entries):
        if not e["passed"]:
            # upstream = earlier tensors of the same forward pass (the forward stage runs an
            # eval pass, then a train-mode pass that does not depend on the eval one)
            up = [x for x in entries[:i] if x.get("kind") == "tensor"
                  and (e.get("mode") is None or x.get("mode") == e.get("mode"))]
            last = entries[i - 1] if i > 0 else None
            return {
                "index": i, "name": e["name"], "module": e["module"], "group": e["group"],
                "err": e.get("err"), "floor": e.get("floor"), "ratio": e.get("ratio"),
                "agreement": e.get("agreement"), "reason": e.get("reason"),
                "last_passing": last["name"] if last else None,
                "last_passing_err": last.get("err") if last else None,
                "upstream_max_err": max((x["err"] for x in up), default=None),
                "upstream_max_ratio": max((x["ratio"] for x in up if "ratio" in x), default=None),
                "n_failed": sum(1 for x in entries if not x["passed"]),
            }
    return {}
