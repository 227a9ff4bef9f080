"""Discrete decisions are classified, not counted (parity/judge/decisions.py): an order flip or a
tie within float32's measured noise passes and is reported with its gap; a gap beyond the
noise fails.  Pure numpy: runs in both environments."""
from __future__ import annotations

import numpy as np

from parity.judge import compare as C
from parity.judge import decisions as D


def _scores(seed=0, s=50):
    rng = np.random.default_rng(seed)
    exact = rng.standard_normal((1, s))
    base = exact + 1e-6 * rng.standard_normal((1, s))        # float32's noise ~1e-6
    return base, exact


def _topk(x, q):
    return np.argsort(-x, axis=1, kind="stable")[:, :q]


def test_same_selection_is_identical():
    base, exact = _scores()
    t = _topk(base, 10)
    cls = D.classify_topk(t, t, base, exact, k=4)
    assert cls["kind"] == "same" and C.judge_topk("k", t, t, cls)["rule"] == "exact"


def test_order_flip_within_noise_is_an_order_flip():
    base, exact = _scores()
    t = _topk(base, 10)
    exact[0, t[0, 3]] = exact[0, t[0, 4]] + 5e-7          # two neighbours within the noise
    base[0, t[0, 3]] = exact[0, t[0, 3]]
    own = t.copy()
    own[0, [3, 4]] = own[0, [4, 3]]
    cls = D.classify_topk(own, t, base, exact, k=4)
    assert cls["kind"] == "order" and cls["gap"] < 4 * cls["noise"] + 1e-12
    e = C.judge_topk("k", own, t, cls)
    assert e["passed"] and e["rule"] == "order" and "order flip at gap" in e["flip"]


def test_set_flip_within_noise_is_a_tie_and_beyond_is_a_flip():
    base, exact = _scores()
    full = _topk(exact, 50)[0]
    t = full[None, :10]
    exact[0, full[10]] = exact[0, full[9]] - 2e-7          # the 11th is within noise of the 10th
    base[0, full[10]] = exact[0, full[10]]
    own = t.copy()
    own[0, 9] = full[10]
    cls = D.classify_topk(own, t, base, exact, k=4)
    assert cls["kind"] == "tie"
    assert C.judge_topk("k", own, t, cls)["passed"]
    far = t.copy()
    far[0, 0] = full[40]                                    # a low-scoring token picked first
    cls = D.classify_topk(far, t, base, exact, k=4)
    assert cls["kind"] == "flip" and cls["gap"] > 100 * cls["noise"]
    e = C.judge_topk("k", far, t, cls)
    assert not e["passed"] and "flip beyond float noise" in e["reason"]


def test_float64_noise_is_relative_rounding():
    _, exact = _scores()
    t = _topk(exact, 10)
    own = t.copy()
    own[0, [0, 1]] = own[0, [1, 0]]
    cls = D.classify_topk(own, t, exact, exact, k=4, noise_rel=1e-12)
    assert cls["kind"] == "flip"                           # a real gap is far above 1e-12


def test_matches_tie_and_flip():
    rng = np.random.default_rng(3)
    ce = rng.uniform(1, 2, (1, 6, 2))                     # one image, 6 queries, 2 targets
    ce[0, 0, 0], ce[0, 1, 0] = 0.1, 0.1 + 1e-7            # queries 0 and 1 tie for target 0
    ce[0, 2, 1] = 0.2
    cb = ce + 1e-6 * rng.standard_normal(ce.shape)
    base = [np.array([[0, 2], [0, 1]])]
    own = [np.array([[1, 2], [0, 1]])]
    cls = D.classify_matches(own, base, cb, ce, [2], k=4)
    assert cls["kind"] == "tie"
    e = C.judge_matches("matches.final", own, base, cls)
    assert e["passed"] and e["rule"] == "tie"
    bad = [np.array([[4, 2], [0, 1]])]                     # query 4 costs ~1 more
    cls = D.classify_matches(bad, base, cb, ce, [2], k=4)
    assert cls["kind"] == "flip"
    assert not C.judge_matches("matches.final", bad, base, cls)["passed"]
