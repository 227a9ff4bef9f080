"""Are two train runs the same, bit for bit?  (``parity same RUN_A RUN_B``)

The reproducibility claim of a training curve: a second run of the same command, or a run
interrupted (``--stop-after-epoch``) and continued (``--resume``), must give exactly the
first run's numbers.  Per side present in both runs, compared exactly (floats by value,
``==``; no tolerance):

* every per-iteration record of ``log.json`` (each loss term, total, gradient norm, lr per
  group, batch indices, denoising box count, multi-scale size), timing excluded;
* every epoch's means (loss terms, total, gradient norm, lr), timing and memory excluded;
* the COCO metrics of every evaluated epoch (``result.json`` ``map``);
* every tensor of ``final.safetensors`` (bitwise, dtype and shape included).

Returns data; the command turns it into a table and an exit code.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from safetensors import safe_open

from parity.fileio import read_json

# per-record fields that measure the machine, not the computation
TIMING_KEYS = ("seconds", "seconds_per_iteration", "peak_rss_mb")


def _strip(rec: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS}


def _first_difference(a: List[Dict[str, Any]], b: List[Dict[str, Any]], what: str) -> Optional[str]:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} {what}s"
    for i, (ra, rb) in enumerate(zip(a, b)):
        sa, sb = _strip(ra), _strip(rb)
        if sa != sb:
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            return f"{what} {i + 1}: {', '.join(keys[:4])} differ"
    return None


def _weights_difference(pa: str, pb: str) -> Dict[str, Any]:
    """Bitwise comparison of two safetensors files: tensor count and the differing names."""
    if not (os.path.isfile(pa) and os.path.isfile(pb)):
        return {"n": 0, "differ": ["final.safetensors missing"]}
    differ = []
    with safe_open(pa, framework="numpy") as fa, safe_open(pb, framework="numpy") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        names = sorted(ka | kb)
        for n in names:
            if n not in ka or n not in kb:
                differ.append(n)
                continue
            x, y = fa.get_tensor(n), fb.get_tensor(n)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                differ.append(n)
    return {"n": len(names), "differ": differ}


def same_side(dir_a: str, dir_b: str, map_a: Dict[str, Any], map_b: Dict[str, Any]) -> Dict[str, Any]:
    """One side of the two runs compared (see the module docstring)."""
    la, lb = read_json(os.path.join(dir_a, "log.json")), read_json(os.path.join(dir_b, "log.json"))
    w = _weights_difference(os.path.join(dir_a, "final.safetensors"), os.path.join(dir_b, "final.safetensors"))
    rows = {
        "iterations": _first_difference(la.get("iterations", []), lb.get("iterations", []), "iteration"),
        "epochs": _first_difference(la.get("epochs", []), lb.get("epochs", []), "epoch"),
        "map": None if map_a == map_b else f"mAP differs at epochs "
                                           f"{sorted(k for k in set(map_a) | set(map_b) if map_a.get(k) != map_b.get(k))}",
        "final_weights": f"{len(w['differ'])} of {w['n']} tensors differ ({', '.join(w['differ'][:3])})"
                         if w["differ"] else None,
    }
    return {"iterations": len(la.get("iterations", [])), "epochs": len(la.get("epochs", [])),
            "map_epochs": sorted(map_a), "tensors": w["n"],
            "resumed": [r.get("from_epoch") for r in lb.get("resumed", [])] or None,
            "differences": rows, "same": all(v is None for v in rows.values())}


def same_runs(run_a: str, run_b: str) -> Dict[str, Any]:
    """Every side present in both train runs compared; ``same`` only if every side is."""
    for path in (run_a, run_b):
        if not os.path.isfile(os.path.join(path, "result.json")):
            raise ValueError(f"{path}: no result.json (not a finished run folder)")
    ra, rb = read_json(os.path.join(run_a, "result.json")), read_json(os.path.join(run_b, "result.json"))
    for path, r in ((run_a, ra), (run_b, rb)):
        if r.get("stage") != "train":
            raise ValueError(f"{path}: not a train run (stage {r.get('stage')!r})")
    labels_a = [s["label"] for s in ra.get("sides", [])]
    labels = [lb for lb in labels_a if lb in {s["label"] for s in rb.get("sides", [])}]
    if not labels:
        raise ValueError(f"{run_a} and {run_b} have no side in common")
    sides = {lb: same_side(os.path.join(run_a, lb), os.path.join(run_b, lb),
                           (ra.get("map") or {}).get(lb, {}), (rb.get("map") or {}).get(lb, {})) for lb in labels}
    same_config = ra.get("config_digest") == rb.get("config_digest")
    return {"run_a": os.path.abspath(run_a), "run_b": os.path.abspath(run_b),
            "config_digest": [ra.get("config_digest"), rb.get("config_digest")], "same_config": same_config,
            "sides": sides, "same": same_config and all(s["same"] for s in sides.values())}
