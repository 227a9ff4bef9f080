"""The verdict of a ``parity run --dtype both`` (the forward/grad default): float64 is the
arbiter, float32 is judged against its own noise floor.

* float64 (J64 vs T64, both under the same decisions, their own decisions classified) must
  pass: there a real bug stands many orders of magnitude above rounding.
* float32 (J32 vs T32 with the T64 floor) must pass too -- every forward tensor, decision and
  loss strictly.  A float32 *gradient or step* tensor that fails while its float64 twin passes
  (and while everything of the float32 forward passes) is *reported, not failed*, with its
  evidence, when its error against the exact answer stays within the floor rule's absolute
  cap and cosine bound:
  - ``kink``: >= 90 % of the error in a few rows: a ReLU input or a grid_sample location
    within float32 rounding of its kink took the other branch on one side (for a step: an
    AdamW update of gradient elements within rounding of 0), which no k x floor bounds;
  - ``amplified``: the excess is spread, as when a kink upstream or train-mode BatchNorm over
    a handful of values (batch 1, a 3x5 map) amplifies float32 rounding through the backward
    pass -- measured on smoke at batch 1: ratios 8..52 on backbone/encoder gradients while
    float64 agrees to 1e-13.  Float32 cannot tell more here; float64 decides.
  - ``adamw`` (step): >= 90 % of the update error in elements whose gradient is within
    float32 noise of zero, where AdamW's first update g/(|g|+eps) is decided by rounding;
  - ``noisy``: within k x its floor but above the cap: the floor itself is that large (the
    first AdamW update of a gradient within rounding of 0 is O(lr) either way).
  A float32 excess beyond k x floor AND beyond the cap (or pointing elsewhere) fails whatever
  float64 says: a float32-only code path (Jittor's float32 GEMM attention, say) is judged by
  float32 alone.
* Without a float64 run (``--dtype float32``, or float64 skipped over its time budget) the
  same tensors are reported and the verdict is marked provisional.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from parity.judge.run_compare import build_result


EXPLAINABLE_GROUPS = ("grads", "step")


def kink_evidence(e: Dict[str, Any]) -> str:
    """Why a failing float32 grads/step tensor may be reported rather than failed, or ''
    (see the module docstring)."""
    th = e.get("threshold") or {}
    nz = e.get("near_zero_grad")
    if nz and nz["share"] >= 0.9:
        return (f"adamw: {100 * nz['share']:.0f}% of the update error in the {nz['elements']} of {nz['n']} elements "
                f"whose gradient is within float32 noise of 0 (AdamW's g/(|g|+eps) decided by rounding)")
    if e.get("cap_only"):
        return (f"noisy: {e['ratio']:.3g}x the float32 floor {e['floor']:.2g} (within k) but above the cap "
                f"{th.get('cap')}: float32 cannot judge this tensor, float64 decides")
    if not (e.get("within_cap") and e.get("cos_ok")):
        return ""
    conc = e.get("concentration")
    if conc and conc.get("few"):
        what = ("the update of a few units differs (a kink flip in their gradient)"
                if e.get("group") == "step" else "a float32 kink flip")
        return (f"kink: {100 * conc['share']:.0f}% of the error in {conc['rows_needed']} of {conc['rows']} rows "
                f"(row {conc['row']} the largest): {what}")
    spread = f" over {conc['rows_needed']} of {conc['rows']} rows" if conc else ""
    return (f"amplified: {e.get('ratio', 0):.3g}x the floor{spread}, {e['err_ref']:.2g} from the exact answer "
            f"(<= cap {th['cap']:g}): float32 rounding amplified in the backward pass")


def explain_float32(r32: Dict[str, Any], r64: Optional[Dict[str, Any]], stage: str) -> List[Dict[str, Any]]:
    """Mark the float32 grads/step failures that kink evidence explains (see the module
    docstring) as ``rule: explained``; with ``r64`` only where float64 passed them, without
    it provisionally.  Re-computes r32's groups, first divergence and verdict."""
    ok64 = r64 is None or bool(r64["passed"])
    # a kink flips a branch of the BACKWARD pass only: with anything failing upstream (the
    # forward tensors, decisions, losses) the gradient excess is that failure's, not a kink's
    if any(not e["passed"] for e in r32["tensors"] if e["group"] not in EXPLAINABLE_GROUPS):
        ok64 = False
    names64 = None if r64 is None else {e["name"]: e["passed"] for e in r64["tensors"]}
    explained: List[Dict[str, Any]] = []
    for e in r32["tensors"]:
        if e["passed"] or e["group"] not in EXPLAINABLE_GROUPS or not ok64:
            continue
        if names64 is not None and not names64.get(e["name"]):
            continue
        why = kink_evidence(e)
        if why:
            e.update(passed=True, rule="explained", explained=why)
            explained.append({"name": e["name"], "group": e["group"], "ratio": e.get("ratio"),
                              "err": e.get("err"), "floor": e.get("floor"), "evidence": why})
    if explained:        # the float32 groups, verdict and first divergence after the explanations
        ok32 = all(e["passed"] for e in r32["tensors"])
        r32.update(build_result(stage, "float32", r32["tensors"], r32["labels"]))
        r32.update(passed=ok32, status="pass" if ok32 else "fail")
    r32["explained"] = explained
    if r64 is None:
        r32["provisional"] = bool(explained)
        r32["verdict_basis"] = ("float32 only, PROVISIONAL: kink-like float32 excesses were not confirmed by a "
                                "float64 run (--dtype both)" if explained else "float32 within its noise floor")
    return explained


def combine(results: Dict[str, Dict[str, Any]], base_info: Dict[str, Any], stage: str, dtype: str) -> Dict[str, Any]:
    r64, r32 = results["float64"], results["float32"]
    ok64 = bool(r64["passed"])
    explained = explain_float32(r32, r64, stage)
    ok32 = bool(r32["passed"])
    passed = ok64 and ok32
    res = dict(base_info)
    res.update(dtype=dtype, stage=stage, status="pass" if passed else "fail", passed=passed,
               verdict_basis="float64 arbiter + float32 within its noise floor",
               runs={"float64": r64, "float32": r32}, explained=explained,
               first_divergence=(r64.get("first_divergence") or r32.get("first_divergence")),
               labels={"float64": r64["labels"], "float32": r32["labels"]})
    return res
