"""Unit tests of the parity harness logic on synthetic arrays (numpy only, both envs)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from parity.fileio import jsonable
from parity.judge import compare as C
from parity.judge import summary as S
from parity.judge.thresholds import DEFAULT_PATH, GroupThreshold, ThresholdError, load_thresholds
from parity.report.forward import describe_divergence

TH = load_thresholds()


def _noisy(x, rel, seed):
    """x plus Gaussian noise of relative L2 size ``rel``."""
    n = np.random.default_rng(seed).standard_normal(x.shape)
    return x + n * (rel * np.linalg.norm(x) / np.linalg.norm(n))


# --- metrics ------------------------------------------------------------------------------

def test_tensor_errors_basic():
    b = np.array([1.0, -2.0, 4.0])
    e = C.tensor_errors(b, b)
    assert e["rel_l2"] == 0 and e["max_abs"] == 0 and e["cos"] == pytest.approx(1.0)
    a = b + np.array([0.0, 0.0, 0.4])
    e = C.tensor_errors(a, b)
    assert e["max_abs"] == pytest.approx(0.4)
    assert e["max_rel"] == pytest.approx(0.1)                       # 0.4 / max|b|
    assert e["rel_l2"] == pytest.approx(0.4 / np.linalg.norm(b))
    assert C.tensor_errors(np.zeros(3), np.zeros(3))["rel_l2"] == 0


def test_tensor_errors_shape_and_nonfinite():
    assert "mismatch" in C.tensor_errors(np.zeros(3), np.zeros(4))
    a = np.array([1.0, np.nan, 3.0])
    b = np.array([1.0, 2.0, 3.0])
    e = C.tensor_errors(a, b)
    assert "mismatch" in e and math.isinf(e["rel_l2"])
    same = C.tensor_errors(np.array([1.0, -np.inf]), np.array([1.0, -np.inf]))
    assert "mismatch" not in same and same["nonfinite"] == 1 and same["rel_l2"] == 0


# --- the noise-floor rule -------------------------------------------------------------------

def test_float32_grad_failing_fixed_passes_by_floor_and_says_so():
    """A float32 gradient whose error (3.6e-3) is above the fixed 1e-3 bound but whose
    distance to float64 is within k x torch's own float32 distance passes by 'floor'."""
    th = TH.get("grad", "float32", "grads")
    assert th.rel_l2 == pytest.approx(1e-3) and 1.5 < th.k < 40
    x = np.random.default_rng(0).standard_normal(5000)               # float64 "truth"
    t32 = _noisy(x, 2e-3, 1).astype(np.float32)                      # torch float32: ill-conditioned
    j32 = _noisy(x, 3e-3, 2).astype(np.float32)                      # jittor float32: 1.5x noisier
    e = C.judge_tensor("grad.w", "grads", j32, t32, x, th, module="m")
    assert e["err"] > th.rel_l2                                       # fails the fixed rule...
    assert e["passed"] and e["rule"] == "floor"                       # ...passes by the floor
    assert e["ratio"] == pytest.approx(1.5, rel=0.05)
    assert e["floor"] == pytest.approx(2e-3, rel=0.01)


def test_same_error_in_float64_fails():
    th = TH.get("grad", "float64", "grads")
    assert th.k is None                                               # no floor rule in float64
    x = np.random.default_rng(0).standard_normal(5000)
    t64 = x
    j64 = _noisy(x, 3.6e-3, 2)
    e = C.judge_tensor("grad.w", "grads", j64, t64, None, th)
    assert not e["passed"] and e["rule"] is None
    assert "rel_l2" in e["reason"]


def test_float32_far_beyond_floor_fails_with_ratio():
    th = TH.get("grad", "float32", "grads")
    x = np.random.default_rng(0).standard_normal(5000)
    t32 = _noisy(x, 1e-4, 1).astype(np.float32)
    j32 = _noisy(x, 5e-3, 2).astype(np.float32)                      # 50x the floor
    e = C.judge_tensor("grad.w", "grads", j32, t32, x, th)
    assert not e["passed"]
    assert e["ratio"] > 40 and "ratio" in e["reason"]


def test_fixed_exact_abs_rules_and_allowance():
    th = GroupThreshold(rel_l2=1e-5, atol=1e-9, k=4.0, allowance=2.4e-7)
    x = np.linspace(1, 2, 100)
    assert C.judge_tensor("a", "g", x, x, None, th)["rule"] == "exact"
    assert C.judge_tensor("a", "g", x * (1 + 1e-7), x, None, th)["rule"] == "fixed"
    z = np.zeros(10)
    e = C.judge_tensor("z", "g", z + 1e-12, z, None, th)             # reference is 0: rel err inf
    assert math.isinf(e["err"]) and e["rule"] == "abs"
    # floor exactly 0 (T32 == T64): a couple of ulps pass through the allowance, not inf ratio
    th2 = GroupThreshold(rel_l2=1e-12, k=4.0, allowance=2.4e-7)
    e = C.judge_tensor("b", "g", x * (1 + 1e-7), x, x, th2)
    assert math.isinf(e["ratio"]) and e["rule"] == "floor"


def test_cosine_bound_is_part_of_the_fixed_rule():
    th = GroupThreshold(rel_l2=1.0, cos=0.9999)
    x = np.array([1.0, 0.0])
    e = C.judge_tensor("c", "g", np.array([1.0, 0.5]), x, None, th)   # rel 0.5 ok, cos 0.894
    assert not e["passed"] and "cos" in e["reason"]


def test_shape_mismatch_fails():
    th = GroupThreshold(rel_l2=1.0, atol=1e9)
    e = C.judge_tensor("s", "g", np.zeros(3), np.zeros(4), None, th)
    assert not e["passed"] and "shape" in e["reason"]


# --- discrete decisions ---------------------------------------------------------------------

def test_topk_flip_is_reported_not_hidden():
    """Without evidence to classify it, any top-k difference fails; identical passes as exact."""
    b = np.array([[5, 3, 9, 1], [0, 2, 4, 6]])
    assert C.judge_topk("k", b, b)["passed"] and C.judge_topk("k", b, b)["rule"] == "exact"
    swapped = np.array([[3, 5, 9, 1], [0, 2, 4, 6]])                  # same set, order flipped
    e = C.judge_topk("k", swapped, b)
    assert not e["passed"]
    assert e["overlap"]["set"] == 1.0 and e["overlap"]["positions"] == pytest.approx(0.75)
    other = np.array([[5, 3, 9, 7], [0, 2, 4, 6]])                     # one index replaced
    e = C.judge_topk("k", other, b)
    assert e["overlap"]["set"] == pytest.approx(7 / 8) and not e["passed"] and "differs" in e["reason"]


def test_matches_agreement():
    a = [np.array([[0, 5], [1, 0]]), np.array([[3], [0]])]
    b = [np.array([[0, 5], [1, 0]]), np.array([[3], [0]])]
    assert C.judge_matches("matches.final", a, b)["passed"]
    c = [np.array([[0, 5], [0, 1]]), np.array([[3], [0]])]            # a swapped assignment
    e = C.judge_matches("matches.final", c, b)
    assert not e["passed"] and e["overlap"]["same"] == 1 and e["overlap"]["total"] == 3


def test_exact_integer_outputs():
    assert C.judge_exact("o", "outputs", np.arange(4, dtype=np.int32), np.arange(4))["passed"]
    e = C.judge_exact("o", "outputs", np.array([0, 1, 2, 4]), np.arange(4))
    assert not e["passed"] and e["reason"] == "1 of 4 values differ"


# --- localisation -----------------------------------------------------------------------------

def test_first_divergence_and_last_passing():
    th = GroupThreshold(rel_l2=1e-9)
    x = np.linspace(1, 2, 50)
    names = ["backbone.res_layers.0", "encoder.outputs.0", "decoder.decoder.layers.2",
             "decoder.decoder.layers.3", "decoder.decoder.layers.4"]
    entries = []
    for i, n in enumerate(names):
        cand = x * (1 + (4e-2 if i >= 3 else 1e-12 * (i + 1)))
        entries.append(C.judge_tensor(n, "intermediates", cand, x, None, th))
    fd = S.first_divergence(entries)
    assert fd["module"] == "decoder.decoder.layers.3"
    assert fd["last_passing"] == "decoder.decoder.layers.2"
    assert fd["upstream_max_err"] < 1e-10 and fd["n_failed"] == 2
    s = describe_divergence(fd)
    assert s.startswith("first divergence: decoder.decoder.layers.3") and "upstream all <=" in s
    assert S.first_divergence(entries[:3]) == {}


def test_first_divergence_looks_upstream_within_one_forward_pass():
    """The forward stage runs an eval pass, then a train-mode pass that does not depend on
    it: a train-mode divergence's upstream is the train pass only."""
    th = GroupThreshold(rel_l2=1e-9)
    x = np.linspace(1, 2, 50)
    entries = []
    for mode, pre, errs in (("eval", "", (1e-10, 1e-10)), ("train", "train.", (1e-12, 4e-2))):
        for n, err in zip(("backbone.res_layers.0", "encoder.outputs.0"), errs):
            e = C.judge_tensor(pre + n, "intermediates", x * (1 + err), x, None, th)
            e["mode"] = mode
            entries.append(e)
    assert entries[0]["passed"] and entries[1]["passed"] and not entries[3]["passed"]
    fd = S.first_divergence(entries)
    assert fd["name"] == "train.encoder.outputs.0"
    assert fd["upstream_max_err"] < 1e-11          # the eval pass's 1e-10 is not upstream of it
    for e in entries:
        del e["mode"]                               # entries without a mode: everything before counts
    assert S.first_divergence(entries)["upstream_max_err"] > 1e-11


@pytest.mark.parametrize("param,module", [
    ("backbone.res_layers.1.blocks.0.branch2a.conv.weight", "backbone.res_layers.1"),
    ("backbone.conv1.conv1_1.conv.weight", "backbone.conv1.conv1_1.conv"),
    ("encoder.fpn_blocks.0.conv1.conv.weight", "encoder.fpn_blocks.0"),
    ("encoder.encoder.0.layers.0.linear1.weight", "encoder.encoder.0"),
    ("decoder.decoder.layers.3.cross_attn.value_proj.bias", "decoder.decoder.layers.3"),
    ("decoder.dec_bbox_head.5.layers.2.weight", "decoder.dec_bbox_head.5"),
    ("decoder.denoising_class_embed.weight", "decoder.denoising_class_embed"),
])
def test_module_of(param, module):
    assert S.module_of(param) == module


def test_by_module_worst_first():
    th = GroupThreshold(rel_l2=1e-3)
    x = np.linspace(1, 2, 50)
    es = [C.judge_tensor("grad.a.0.w", "grads", x * (1 + 1e-5), x, None, th, module="a.0"),
          C.judge_tensor("grad.b.1.w", "grads", x * (1 + 1e-2), x, None, th, module="b.1"),
          C.judge_tensor("grad.b.1.v", "grads", x * (1 + 1e-6), x, None, th, module="b.1")]
    mods = S.by_module(es)
    assert [m["module"] for m in mods] == ["b.1", "a.0"]
    assert mods[0]["failed"] == 1 and mods[0]["worst_name"] == "grad.b.1.w" and mods[0]["n"] == 2


def test_jsonable_strict():
    import json
    out = jsonable({"a": np.float32(1.5), "b": math.inf, "c": [np.int64(3), np.nan], "d": np.bool_(True)})
    json.dumps(out, allow_nan=False)
    assert out == {"a": 1.5, "b": "inf", "c": [3, "nan"], "d": True}


# --- thresholds file ----------------------------------------------------------------------------

def test_bundled_thresholds():
    assert TH.get("forward", "float64", "outputs").rel_l2 == pytest.approx(1e-9)
    assert TH.get("grad", "float64", "grads").rel_l2 == pytest.approx(1e-7)
    assert TH.get("forward", "float32", "outputs").rel_l2 == pytest.approx(1e-5)
    assert TH.get("grad", "float32", "outputs").rel_l2 == pytest.approx(1e-4)
    assert TH.get("grad", "float32", "losses").rel_l2 == pytest.approx(1e-5)
    g = TH.get("grad", "float32", "grads")
    assert g.cos == pytest.approx(0.9999) and g.k is not None
    assert TH.get("forward", "float64", "intermediates").k is None
    assert TH.min_agreement == 1.0


def test_threshold_file_errors(tmp_path):
    import yaml
    with open(DEFAULT_PATH) as fh:
        data = yaml.safe_load(fh)
    bad = dict(data)
    bad["grad"] = {**data["grad"], "float32": {**data["grad"]["float32"], "grads": {"rel_l2": 1e-3, "tol": 1}}}
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ThresholdError, match="grad.float32.grads.tol"):
        load_thresholds(str(p))
    missing = dict(data)
    missing["forward"] = {"float32": data["forward"]["float32"]}
    p.write_text(yaml.safe_dump(missing))
    with pytest.raises(ThresholdError, match="forward.float64"):
        load_thresholds(str(p))
    with pytest.raises(ThresholdError, match="not found"):
        load_thresholds(str(tmp_path / "nope.yaml"))


def test_step_is_judged_on_the_update():
    """Hole: judged on the parameters, a learning rate 4 % off passed as 'fixed' (the update
    is ~1e-3 of the parameter).  Judged on the update it fails; a correct step passes."""
    th = TH.get("grad", "float32", "step")
    rng = np.random.default_rng(0)
    before = rng.normal(0, 1.0, 4096).astype(np.float32)
    lr = 1e-4
    g = rng.standard_normal(4096)
    t64 = before.astype(np.float64) - lr * np.sign(g)
    t32 = (before - np.float32(lr) * np.sign(g).astype(np.float32)).astype(np.float32)
    wrong_lr = (before - np.float32(1.04 * lr) * np.sign(g).astype(np.float32)).astype(np.float32)
    old = C.tensor_errors(wrong_lr, t32)["rel_l2"]
    assert old < 1e-5                                  # the old rule on parameters: would pass
    e = C.judge_tensor("step.w", "step", wrong_lr, t32, t64, th, before=before)
    assert not e["passed"] and e["on"] == "update" and e["err"] == pytest.approx(0.04, rel=1e-2)
    e = C.judge_tensor("step.w", "step", t32.copy(), t32, t64, th, before=before)
    assert e["passed"]
    th64 = TH.get("grad", "float64", "step")
    e = C.judge_tensor("step.w", "step", before.astype(np.float64) - 1.04 * lr * np.sign(g), t64, None, th64,
                       before=before)
    assert not e["passed"]


def test_abs_rule_only_for_a_zero_reference():
    """Hole: 'abs' applied to every tensor, so a sign-flipped tensor of magnitude 1e-10 passed.
    Now it applies only where the exact value is ~0 (zero_ref); a true-zero gradient whose
    float32 residue is as small as PyTorch's own still passes."""
    th = TH.get("grad", "float32", "grads")
    rng = np.random.default_rng(1)
    t64 = 1e-10 * rng.standard_normal(64)
    t32 = (t64 * (1 + 1e-7 * rng.standard_normal(64))).astype(np.float32)
    assert C.tensor_errors(-t32, t32)["max_abs"] <= th.atol            # the old rule: abs pass
    e = C.judge_tensor("grad.tiny", "grads", -t32, t32, t64, th)
    assert not e["passed"]
    z64 = 1e-18 * rng.standard_normal(64)                               # a true zero in float64
    z32 = (3e-9 * rng.standard_normal(64)).astype(np.float32)           # PyTorch float32's residue
    j32 = (3e-9 * rng.standard_normal(64)).astype(np.float32)           # Jittor's, as large
    e = C.judge_tensor("grad.zero", "grads", j32, z32, z64, th)
    assert e["passed"] and e["rule"] == "abs"
    e = C.judge_tensor("grad.zero", "grads", (j32 * 1e3).astype(np.float32), z32, z64, th)
    assert not e["passed"]                                              # not ~0 any more


def test_floor_rule_needs_cap_and_cosine():
    """Hole: with a 5 % floor a 30 % scale error passed by the floor rule (ratio 5.9)."""
    th = TH.get("grad", "float32", "grads")
    rng = np.random.default_rng(2)
    t64 = rng.standard_normal(4096)
    t32 = t64 + 0.05 * rng.standard_normal(4096)                        # a 5 % float32 floor
    scaled = 1.3 * t64 + 0.05 * rng.standard_normal(4096)
    e = C.judge_tensor("grad.s", "grads", scaled, t32, t64, th)
    assert e["ratio"] < th.k                                            # the old floor rule: pass
    assert not e["passed"] and "cap" in e["reason"]
    fine = t64 + 0.05 * rng.standard_normal(4096)
    e = C.judge_tensor("grad.s", "grads", fine, t32, t64, th)
    assert e["passed"] and e["rule"] == "floor"


def test_nan_fails_and_is_counted():
    """Hole: a tensor NaN on both sides passed as 'exact'.  NaN fails with counts; an inf
    where the exact reference has the same inf (masked anchors) still passes."""
    th = TH.get("forward", "float32", "intermediates")
    x = np.ones(8, dtype=np.float32)
    x[3] = np.nan
    e = C.judge_tensor("t", "intermediates", x, x.copy(), x.astype(np.float64), th)
    assert not e["passed"] and "1 NaN" in e["reason"] and e["nonfinite"]["cand"]["nan"] == 1
    y = np.ones(8, dtype=np.float32)
    y[2] = np.inf
    e = C.judge_tensor("t", "intermediates", y, y.copy(), y.astype(np.float64), th)
    assert e["passed"] and e["nonfinite"]["cand"]["inf"] == 1
    e = C.judge_tensor("t", "intermediates", y, y.copy(), np.ones(8), th)
    assert not e["passed"]                                              # inf where the truth is finite


def test_failure_reason_points_at_an_error_held_by_one_row():
    """A float32 kink flip puts a weight gradient's error in one unit's row: the reason says
    so (a hint only -- the tensor still fails); spread-out error gets no such hint."""
    th = GroupThreshold(rel_l2=1e-6, k=4.0, allowance=0.0)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 8))
    base = ref * (1 + 1e-7 * rng.standard_normal(ref.shape))          # PyTorch float32: tiny noise
    one_row = base.copy()
    one_row[5] += 1e-3                                                 # one unit took the other branch
    e = C.judge_tensor("grad.w", "grads", one_row, base, ref, th)
    assert not e["passed"] and e["concentration"]["row"] == 5 and e["concentration"]["share"] > 0.99
    assert "of the error in 1 of 16 rows (row 5 the largest" in e["reason"]
    spread = base + 1e-3 * rng.standard_normal(ref.shape)
    e = C.judge_tensor("grad.w", "grads", spread, base, ref, th)
    assert not e["passed"] and not e["concentration"]["few"] and "row" not in e["reason"]
