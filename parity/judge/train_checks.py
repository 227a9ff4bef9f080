"""The verdict of a ``parity run --stage train`` beyond the curve metrics: the metrics of
every pair of sides (candidate vs base, judged; base vs reference and candidate vs
reference, the float32 floor), what the plan asked for, each side's inputs and finiteness,
and the run's status.  A side is any object with ``label``, ``role`` and ``dir`` (the side
folder, parity/sides/train.py)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from rtdetr_core.param_spec import param_spec
from safetensors.numpy import load_file

from parity.judge import curves
from parity.judge.train_state import buffer_errors, eval_output_errors, state_names


def _read_weights(path: str) -> Dict[str, np.ndarray]:
    return load_file(path)


def _trainable_names(cfg) -> List[str]:
    return [e.name for e in param_spec(cfg) if e.kind == "param" and e.trainable]


def expected_evals(plan: Dict[str, Any], epochs_done: int) -> List[int]:
    """Epochs the plan evaluates (every ``eval_every`` and the last), up to ``epochs_done``."""
    E, every = int(plan["epochs"]), int(plan.get("eval_every") or 0)
    return [e for e in range(1, min(epochs_done, E) + 1) if e == E or (every > 0 and e % every == 0)]


def _epochs_done(log: Dict[str, Any]) -> int:
    return len([e for e in log.get("epochs", []) if e.get("complete", True)])


def compare(out: str, sides: Sequence[Any], logs: Dict[str, Dict[str, Any]], maps: Dict[str, Any], cfg,
            thresholds, plan: Optional[Dict[str, Any]] = None, max_tie_rows: int = 4) -> Dict[str, Any]:
    base = next((s for s in sides if s.role == "base"), None)
    cand = next((s for s in sides if s.role == "cand"), None)
    ref = next((s for s in sides if s.role == "ref"), None)
    names = _trainable_names(cfg)
    floating, integer = state_names(cfg)
    w_init = _read_weights(os.path.join(out, "case", "weights.safetensors"))
    finals = {}
    for s in sides:
        p = os.path.join(s.dir, "final.safetensors")
        if os.path.isfile(p):
            finals[s.label] = _read_weights(p)

    def metrics(a, b, judged: bool):
        # what the plan asked for (judged pair only; the floor pair is context): every eval
        # epoch both sides completed, and the final state when both completed
        la, lb = logs[a.label], logs[b.label]
        both_done = la.get("status") == "completed" and lb.get("status") == "completed"
        want = expected_evals(plan, min(_epochs_done(la), _epochs_done(lb))) if (judged and plan) else []
        return curves.curve_metrics(la, lb, map_cand=maps.get(a.label), map_base=maps.get(b.label),
                                    w_cand=finals.get(a.label), w_base=finals.get(b.label), w_init=w_init, names=names,
                                    buffers=buffer_errors(a.dir, b.dir, floating, integer),
                                    eval_outputs=eval_output_errors(a.dir, b.dir, max_tie_rows),
                                    expect_evals=want, expect_final=judged and both_done, labels=(a.label, b.label),
                                    lockstep_rel=thresholds.lockstep_rel, window=thresholds.window)
    res: Dict[str, Any] = {}
    if base is not None and cand is not None:
        res["cand_base"] = metrics(cand, base, True)
    if base is not None and ref is not None:
        res["base_ref"] = metrics(base, ref, False)
    if cand is not None and ref is not None:
        res["cand_ref"] = metrics(cand, ref, False)
    # each side's movement: how far training moved the weights (context for the drift)
    res["update_l2"] = {lab: float(np.sqrt(sum(float(np.sum((np.asarray(w[n], np.float64) - np.asarray(w_init[n], np.float64)) ** 2))
                                               for n in names))) for lab, w in finals.items()}
    return res


def side_checks(sides: Sequence[Any], logs: Dict[str, Dict[str, Any]],
                case_digests: Dict[str, Any]) -> Tuple[Dict[str, bool], List[Dict[str, Any]]]:
    """``(inputs_ok, checks)``: per side, did it consume exactly the case's streams, and did
    its losses stay finite (verdict sides)."""
    inputs_ok: Dict[str, bool] = {}
    checks: List[Dict[str, Any]] = []
    for s in sides:
        got = [(r["epoch"], r["step"], r["batch"]) for r in logs[s.label]["iterations"]]
        # all([]) is True: a side that consumed nothing proved nothing about its inputs
        inputs_ok[s.label] = bool(got) and all(case_digests[str(e)][k] == b for e, k, b in got)
        c = {"check": f"inputs_{s.label}", "text": f"{s.label} consumed exactly the case's streams",
             "value": inputs_ok[s.label], "passed": inputs_ok[s.label], "rule": "exact"}
        if not inputs_ok[s.label]:
            c["reason"] = f"{s.label} logged no iteration" if not got else f"{s.label} did not consume the case's streams"
        checks.append(c)
    verdict_sides = [s for s in sides if s.role != "ref"]
    for s in verdict_sides:
        nf = logs[s.label].get("nonfinite")
        if nf:
            # never a pass, even when both sides blow up at the same iteration: a run that
            # ends in NaN compares nothing after it (and a shared NaN may be a shared bug)
            others = [logs[o.label].get("nonfinite") for o in verdict_sides if o is not s]
            same = bool(others) and all(o and o["iteration"] == nf["iteration"] for o in others)
            checks.append({"check": f"finite_{s.label}", "passed": False, "rule": "exact",
                           "text": f"{s.label} losses stay finite", "same_iteration_on_all_sides": same,
                           "value": f"non-finite {nf['term']} at iteration {nf['iteration']} (epoch {nf['epoch']})",
                           "reason": f"{s.label} stopped: non-finite {nf['term']} at iteration {nf['iteration']}"
                                     + (" (every side at the same iteration: nothing is compared after it)"
                                        if same else "")})
    return inputs_ok, checks


def verdict(checks: Sequence[Mapping[str, Any]], statuses: Mapping[str, Any], compared: bool) -> Tuple[str, bool]:
    """``(status, passed)`` of the run: ``stopped`` (on request, no verdict), ``single`` (one
    backend, nothing compared), else ``pass`` / ``fail``."""
    passed = all(c["passed"] for c in checks)
    if any(v == "stopped" for v in statuses.values()):
        return "stopped", passed
    if not compared:
        return ("single" if passed else "fail"), passed
    return ("pass" if passed else "fail"), passed
