"""The train stage's discrete decisions (parity/judge/train_decisions.py,
parity/workers/train_decisions.py, parity/commands/train_ties.py): canonical comparison,
classification from probe evidence, the --follow file, and one end-to-end run where the
candidate's decision is a real flip (a perturbed score head) and must FAIL as one.

The tie path end to end (a float32 data-parallel run whose J32 resolves a near-tie the other
way, classified, followed and passed) is in tests/test_parity_nproc.py."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import REPO, env_python

from parity.judge import train_decisions as TD
from parity.workers.train_decisions import flatten, unflatten


def _dec(topk, matches):
    return {"topk_index": np.asarray(topk, dtype=np.int64),
            "matches": {c: [np.asarray(m, dtype=np.int64).reshape(2, -1) for m in per] for c, per in matches.items()}}


def test_an_order_flip_inside_the_top_k_is_no_divergence():
    base = _dec([[10, 11, 12]], {"final": [[[0, 2], [0, 1]]]})            # rows 0, 2 -> tokens 10, 12
    cand = _dec([[11, 10, 12]], {"final": [[[1, 2], [0, 1]]]})            # same tokens, other rows
    assert TD.compare_iteration(cand, base) is None


def test_a_different_token_or_assignment_is_a_divergence():
    base = _dec([[10, 11, 12]], {"final": [[[0, 2], [0, 1]]]})
    assert TD.compare_iteration(_dec([[10, 11, 13]], {"final": [[[0, 2], [0, 1]]]}), base)["what"] == "topk"
    swapped = _dec([[10, 11, 12]], {"final": [[[0, 2], [1, 0]]]})          # targets exchanged
    assert TD.compare_iteration(swapped, base) == {"image": 0, "what": "match/final"}


def _probe(topk, scores, costs, matches):
    p = flatten("own/", _dec(topk, matches))
    p["evidence/topk_scores"] = np.asarray(scores, dtype=np.float64)
    p["evidence/match_cost/final"] = np.asarray(costs, dtype=np.float64)
    return p


def test_a_near_tie_is_a_tie_and_a_clear_loss_is_a_flip():
    # four tokens, Q = 2; tokens 1 and 2 are within float32 noise of each other
    exact = [[5.0, 3.0, 3.0 + 1e-7, 1.0]]
    base32 = [[5.0, 3.0 + 3e-7, 3.0, 1.0]]             # T32 vs T64 noise 3e-7
    costs = np.array([[[0.0, 1.0], [1.0, 0.0]]])       # [b, Q, T]
    base = _probe([[0, 1]], base32, costs, {"final": [[[0, 1], [0, 1]]]})
    ref = _probe([[0, 2]], exact, costs, {"final": [[[0, 1], [0, 1]]]})
    tie = TD.classify(_dec([[0, 2]], {"final": [[[0, 1], [0, 1]]]}), base, ref, tie_k=4.0)
    assert tie["kind"] == "tie" and tie["topk"]["kind"] == "tie"
    flip = TD.classify(_dec([[0, 3]], {"final": [[[0, 1], [0, 1]]]}), base, ref, tie_k=4.0)
    assert flip["kind"] == "flip" and flip["topk"]["gap"] == pytest.approx(2.0)


def test_an_assignment_costing_more_than_the_noise_is_a_flip():
    scores = [[5.0, 4.0, 1.0]]
    costs_exact = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    costs_32 = costs_exact + 1e-7
    base = _probe([[0, 1]], scores, costs_32, {"final": [[[0, 1], [0, 1]]]})
    ref = _probe([[0, 1]], scores, costs_exact, {"final": [[[0, 1], [0, 1]]]})
    cls = TD.classify(_dec([[0, 1]], {"final": [[[0, 1], [1, 0]]]}), base, ref, tie_k=4.0)
    assert cls["kind"] == "flip" and cls["matches"]["final"]["gap"] == pytest.approx(2.0)
    # the same assignment on a tied cost matrix is a tie
    tied = np.array([[[1.0, 1.0], [1.0, 1.0 + 1e-8]]])
    base = _probe([[0, 1]], scores, tied + 1e-7, {"final": [[[0, 1], [0, 1]]]})
    ref = _probe([[0, 1]], scores, tied, {"final": [[[0, 1], [0, 1]]]})
    assert TD.classify(_dec([[0, 1]], {"final": [[[0, 1], [1, 0]]]}), base, ref, tie_k=4.0)["kind"] == "tie"


def test_follow_file_round_trip(tmp_path):
    d = _dec([[3, 1, 2]], {"final": [[[0, 1], [1, 0]]], "aux_0": [[[2], [0]]]})
    side = tmp_path / "T32"
    (side / "decisions").mkdir(parents=True)
    np.savez(side / "decisions" / "epoch_0001.rank0.npz", **flatten("7/", d), **flatten("8/", d))
    arrays = TD.follow_arrays(str(side), [8], ranks=1)
    assert all(k.startswith("r0/8/") for k in arrays)
    back = unflatten(arrays, "r0/8/")
    assert np.array_equal(back["topk_index"], d["topk_index"])
    assert [m.tolist() for m in back["matches"]["final"]] == [m.tolist() for m in d["matches"]["final"]]
    assert TD.read_epoch(str(side), 1, 0)[7]["matches"]["aux_0"][0].tolist() == [[2], [0]]


@pytest.mark.torch
def test_a_perturbed_score_head_flips_decisions_and_fails_as_a_flip(tmp_path):
    """A real scoring difference is never followed as a tie: the decisions check FAILs and names it."""
    env = dict(os.environ, RTDETR_PARITY_TORCH_PYTHON=env_python("torch"),
               RTDETR_PARITY_JITTOR_PYTHON=env_python("jittor"))
    out = str(tmp_path / "run")
    r = subprocess.run([env_python("torch"), "-m", "parity", "run", "--stage", "train", "--config", "smoke",
                        "--epochs", "1", "--limit-images", "4", "--inject-fault",
                        "weight:decoder.enc_score_head.weight:noise=0.05", "--out", out],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out, "result.json")) as fh:
        res = json.load(fh)
    dec = {c["check"]: c for c in res["checks"]}["decisions"]
    assert not dec["passed"] and "flip beyond float noise" in dec["reason"]
    assert res["decisions"]["events"][0]["kind"] == "flip" and not res["decisions"]["followed"]
    assert not os.path.exists(os.path.join(out, "J32.follow"))


def test_a_replay_starts_from_the_newest_checkpoint_before_the_iteration(tmp_path):
    from parity.commands.train_ties import prepare_replay
    src = tmp_path / "J32"
    for epoch, it in ((1, 4), (2, 8), (3, 12)):
        ck = src / "checkpoints" / f"epoch_{epoch:04d}"
        ck.mkdir(parents=True)
        (ck / "state.json").write_text(json.dumps({"epoch": epoch, "iteration": it}))
        (src / "decisions").mkdir(exist_ok=True)
        (src / "decisions" / f"epoch_{epoch:04d}.rank0.npz").write_bytes(b"x")
    dst = str(tmp_path / "J32.follow")
    assert prepare_replay(str(src), dst, 9)                   # iteration 9 lies in epoch 3: resume after epoch 2
    assert os.listdir(os.path.join(dst, "checkpoints")) == ["epoch_0002"]
    assert sorted(os.listdir(os.path.join(dst, "decisions"))) == ["epoch_0001.rank0.npz", "epoch_0002.rank0.npz"]
    assert prepare_replay(str(src), dst, 8)                   # iteration 8 is epoch 2's last: after epoch 1
    assert os.listdir(os.path.join(dst, "checkpoints")) == ["epoch_0001"]
    assert not prepare_replay(str(src), dst, 3)               # before the first checkpoint: from the start
    assert os.listdir(dst) == []
    assert prepare_replay(dst, dst, 3) is False               # a replay's own folder can be its source
