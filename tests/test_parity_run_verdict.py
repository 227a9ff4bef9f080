"""The --dtype both verdict (parity/judge/run_verdict.py): float64 arbitrates; a float32 gradient
excess is reported rather than failed only with float64 passing, the float32 forward
passing, and the error within the cap -- never for a float32 error beyond it.  Pure numpy."""
from __future__ import annotations

import numpy as np

from parity.judge import compare as C
from parity.judge.run_verdict import combine, explain_float32
from parity.judge.thresholds import load_thresholds

TH = load_thresholds()


def _grad(cand_scale=1.0, kink_rows=0, seed=0):
    """A float32 gradient entry: exact t64, T32 with 1e-5 noise, J32 with a kink in a few rows."""
    rng = np.random.default_rng(seed)
    t64 = rng.standard_normal((64, 32))
    t32 = t64 + 1e-5 * rng.standard_normal(t64.shape)
    j32 = cand_scale * t64 + 1e-5 * rng.standard_normal(t64.shape)
    j32[:kink_rows] += 0.02 * rng.standard_normal((kink_rows, 32))
    return C.judge_tensor("grad.w", "grads", j32, t32, t64, TH.get("grad", "float32", "grads"))


def _run(entries, passed=None):
    ok = all(e["passed"] for e in entries) if passed is None else passed
    return {"tensors": entries, "passed": ok, "status": "pass" if ok else "fail",
            "labels": {"cand": "J32", "base": "T32", "ref": "T64"}}


def _ok64():
    return _run([{"name": "grad.w", "group": "grads", "passed": True, "kind": "tensor"}])


def test_kink_is_reported_when_float64_passes():
    e = _grad(kink_rows=2)
    assert not e["passed"] and e["concentration"]["few"]
    res = combine({"float64": _ok64(), "float32": _run([e])}, {}, "grad", "both")
    assert res["passed"] and res["explained"][0]["evidence"].startswith("kink")


def test_nothing_is_explained_when_float64_fails():
    e = _grad(kink_rows=2)
    r64 = _run([{"name": "grad.w", "group": "grads", "passed": False, "kind": "tensor"}])
    res = combine({"float64": r64, "float32": _run([e])}, {}, "grad", "both")
    assert not res["passed"] and not res["explained"]


def test_float32_error_beyond_the_cap_fails_even_with_float64_passing():
    e = _grad(cand_scale=1.3)                       # a float32-only 30 % error
    assert not e["passed"] and not e["within_cap"]
    res = combine({"float64": _ok64(), "float32": _run([e])}, {}, "grad", "both")
    assert not res["passed"] and not res["explained"]


def test_no_explanation_when_the_float32_forward_fails():
    e = _grad(kink_rows=2)
    bad_fwd = {"name": "decoder.x", "group": "intermediates", "passed": False, "kind": "tensor"}
    r32 = _run([bad_fwd, e])
    explain_float32(r32, _ok64(), "grad")
    assert not r32["passed"] and not r32["explained"]


def test_float32_only_is_provisional():
    e = _grad(kink_rows=2)
    r32 = _run([e])
    explain_float32(r32, None, "grad")
    assert r32["passed"] and r32["provisional"] and "PROVISIONAL" in r32["verdict_basis"]
