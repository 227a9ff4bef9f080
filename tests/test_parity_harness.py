"""Harness plumbing without frameworks: case folders, fault specs, worker-result comparison,
runner usage/environment errors (numpy only, both envs)."""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

import numpy as np
import pytest

from parity.judge import run_compare as RC
from parity.commands import forward as R
from parity.case.folder import Case, CaseError, build_case
from parity.facts import repo_root
from parity.case.faults import FaultError, parse_fault
from parity.workers.faults import apply_config_faults, apply_weight_faults
from parity.fileio import read_npz_meta, write_npz
from parity.judge.thresholds import load_thresholds
from parity.workers.forward import flatten, normalize_matches
from parity.case.contract import read_decisions, write_decisions
from rtdetr_core.config import load_config


# --- faults ---------------------------------------------------------------------------------

def test_parse_faults():
    f = parse_fault("weight:encoder.fpn_blocks.0.conv1.conv.weight:scale=1.001")
    assert (f.kind, f.target, f.op, f.value) == ("weight", "encoder.fpn_blocks.0.conv1.conv.weight", "scale", 1.001)
    assert parse_fault("upsample:bilinear").kind == "upsample"
    assert parse_fault("config:decoder.num_queries=200").value == 200
    assert parse_fault("crash:abort").target == "abort"
    for bad in ("weight:x", "weight:x:mul=2", "weight:x:scale=abc", "upsample:nearest", "crash:segv", "nope:1"):
        with pytest.raises(FaultError):
            parse_fault(bad)


def test_parse_code_and_optimiser_faults():
    f = parse_fault("code:backward-detach")
    assert (f.kind, f.target) == ("code", "backward-detach")
    f = parse_fault("optim:lr-scale=1.04")
    assert (f.kind, f.target, f.value) == ("optim", "lr-scale", 1.04)
    for bad in ("code:forward-detach", "optim:lr-scale", "optim:lr-scale=0", "optim:lr-scale=x", "optim:beta=2"):
        with pytest.raises(FaultError):
            parse_fault(bad)


def test_apply_faults():
    w = OrderedDict(a=np.ones(4, np.float32), b=np.ones(3, np.float32), n=np.zeros((), np.int64))
    done = apply_weight_faults(w, [parse_fault("weight:a:scale=2")])
    assert done == ["a: scale=2"] and w["a"].dtype == np.float32 and np.all(w["a"] == 2) and np.all(w["b"] == 1)
    apply_weight_faults(w, [parse_fault("weight:b:noise=1e-3")])
    assert 0 < np.abs(w["b"] - 1).max() < 1e-2
    with pytest.raises(FaultError, match="no weight named"):
        apply_weight_faults(w, [parse_fault("weight:zz:add=1")])
    cfg = {"decoder": {"num_queries": 300}}
    apply_config_faults(cfg, [parse_fault("config:decoder.num_queries=200")])
    assert cfg["decoder"]["num_queries"] == 200
    with pytest.raises(FaultError):
        apply_config_faults(cfg, [parse_fault("config:decoder.nope=1")])


# --- worker helpers -------------------------------------------------------------------------

def test_flatten_and_matches_and_decisions(tmp_path):
    flat = OrderedDict()
    flatten("", {"pred_logits": np.zeros((1, 2)), "aux_outputs": [{"pred_boxes": np.ones(2)}],
                 "dn_meta": {"dn_positive_idx": [np.arange(3)], "dn_num_group": 5, "dn_num_split": [4, 6]}}, flat)
    assert list(flat) == ["pred_logits", "aux_outputs.0.pred_boxes", "dn_meta.dn_positive_idx.0",
                          "dn_meta.dn_num_group", "dn_meta.dn_num_split"]
    m = normalize_matches({"final": [(np.array([3, 1]), np.array([0, 1])), np.array([[2], [0]])]})
    assert m["final"][0].shape == (2, 2) and m["final"][0].dtype == np.int64
    p = str(tmp_path / "d.npz")
    write_decisions(p, np.array([[1, 2]]), m)
    topk, mm, train_topk = read_decisions(p)
    assert topk.tolist() == [[1, 2]] and list(mm) == ["final"] and mm["final"][1].tolist() == [[2], [0]]
    assert train_topk is None
    write_decisions(p, None, None, train_topk=np.array([[3, 4]]))
    assert [x if x is None else x.tolist() for x in read_decisions(p)] == [None, None, [[3, 4]]]


# --- case folder ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_case(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("case") / "case")
    m = build_case(d, load_config("smoke"), stage="grad", batch_size=2, seed=0)
    return d, m


def test_case_roundtrip(smoke_case):
    d, m = smoke_case
    assert m["config_digest"] == load_config("smoke").digest()
    assert set(m["files"]) == {"config.json", "config.yaml", "weights.safetensors", "inputs.npz", "dn_draws.npz"}
    c = Case(d)
    assert c.cfg.digest() == m["config_digest"]
    w = c.weights()
    from rtdetr_core.init import seeded_weights
    ref = seeded_weights(load_config("smoke"), 0)
    assert list(w) == list(ref)
    assert all(np.array_equal(w[k], ref[k]) and w[k].shape == ref[k].shape for k in ref)
    images, targets = c.inputs()
    assert images.shape == (2, 3, 96, 160) and images.dtype == np.float32      # non-square: H x W
    assert len(targets) == 2 and targets[0]["boxes"].shape[1] == 4
    assert len(targets[0]["labels"]) > 0 and len(targets[1]["labels"]) == 0      # the hard case: one empty image
    dn = c.dn_draws()
    assert set(dn) == {"label_mask_rand", "new_label", "box_sign_rand01", "box_rand_part"}


def test_case_corruption_detected(smoke_case, tmp_path):
    import shutil
    d, _ = smoke_case
    d2 = str(tmp_path / "c2")
    shutil.copytree(d, d2)
    with open(os.path.join(d2, "inputs.npz"), "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00garbage")
    with pytest.raises(CaseError, match="corrupted"):
        Case(d2)
    os.unlink(os.path.join(d2, "manifest.json"))
    with pytest.raises(CaseError, match="no manifest"):
        Case(d2)


def test_case_bad_weights_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CaseError, match="weights"):
        build_case(str(tmp_path / "c"), load_config("smoke"), stage="forward", batch_size=1, seed=0,
                   weights_path=str(bad))


# --- comparison of worker results (fake workers) ----------------------------------------------

NAMES = ["backbone.conv1", "backbone.res_layers.0", "encoder.fpn_blocks.0", "decoder.enc_topk_index",
         "decoder.decoder.layers.2", "decoder.decoder.layers.3", "decoder.decoder.layers.4", "pred_logits"]


def _fake(path, backend, dtype, *, broken_from=None, noise=0.0, topk_flip=False, seed=0):
    rng = np.random.default_rng(123)
    noise_rng = np.random.default_rng(seed)
    arrays = OrderedDict()
    for i, n in enumerate(NAMES):
        if n.endswith("topk_index"):
            t = np.arange(12).reshape(2, 6)
            if topk_flip:
                t = t.copy()
                t[0, :2] = t[0, 1::-1]
            arrays[f"int/{n}"] = t
            continue
        x = rng.standard_normal((2, 16))
        if noise:
            x = x * (1 + noise * noise_rng.standard_normal(x.shape))
        if broken_from is not None and i >= NAMES.index(broken_from):
            x = x * 1.05
        arrays[f"int/{n}"] = x.astype(dtype)
    meta = {"order": {"intermediates": NAMES, "outputs": ["pred_logits"]}, "backend": backend, "dtype": dtype}
    arrays["out/pred_logits"] = arrays["int/pred_logits"]
    write_npz(path, arrays, meta)


def _edit(path, update):
    """Rewrite a worker result file: ``update(arrays, meta)`` changes both in place."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = read_npz_meta(z)
    update(arrays, meta)
    write_npz(path, arrays, meta)


def test_compare_results_names_first_divergence(tmp_path):
    th = load_thresholds()
    b, c = str(tmp_path / "T64.npz"), str(tmp_path / "J64.npz")
    _fake(b, "torch", "float64")
    _fake(c, "jittor", "float64", broken_from="decoder.decoder.layers.3")
    res = RC.compare_results("forward", "float64", b, c, None, th, cand_shared={})
    r = RC.build_result("forward", "float64", res["entries"], {"cand": "J64", "base": "T64"})
    fd = r["first_divergence"]
    assert fd["module"] == "decoder.decoder.layers.3" and fd["last_passing"] == "decoder.decoder.layers.2"
    assert r["groups"]["intermediates"]["failed"] == 2 and r["groups"]["outputs"]["failed"] == 1
    # pred_logits appears once (the intermediate of that name is the output)
    assert sum(1 for e in res["entries"] if "pred_logits" in e["name"]) == 1


def test_compare_results_float32_floor_and_topk_flip(tmp_path):
    th = load_thresholds()
    t64, t32, j32 = (str(tmp_path / f"{x}.npz") for x in ("T64", "T32", "J32"))
    _fake(t64, "torch", "float64")
    _fake(t32, "torch", "float64", noise=3e-5, seed=1)       # "float32" noise above the fixed 1e-5
    _fake(j32, "jittor", "float64", noise=4e-5, seed=2)
    res = RC.compare_results("forward", "float32", t32, j32, t64, th, cand_shared={})
    tens = [e for e in res["entries"] if e["kind"] == "tensor"]
    assert all(e["passed"] for e in res["entries"])
    assert {e["rule"] for e in tens} == {"floor"}
    _fake(j32, "jittor", "float64", noise=4e-5, seed=2, topk_flip=True)
    res = RC.compare_results("forward", "float32", t32, j32, t64, th, cand_shared={})
    fd = RC.build_result("forward", "float32", res["entries"], {"cand": "J32", "base": "T32", "ref": "T64"})["first_divergence"]
    assert fd["name"] == "decoder.enc_topk_index" and "top-k" in fd["reason"]


def test_compare_results_missing_intermediate(tmp_path):
    th = load_thresholds()
    b, c = str(tmp_path / "T64.npz"), str(tmp_path / "J64.npz")
    _fake(b, "torch", "float64")
    _fake(c, "jittor", "float64")
    with np.load(c) as z:
        arrays = {k: z[k] for k in z.files if k != "int/encoder.fpn_blocks.0"}
    os.unlink(c)
    np.savez(c, **arrays)
    res = RC.compare_results("forward", "float64", b, c, None, th, cand_shared={})
    bad = [e for e in res["entries"] if not e["passed"]]
    assert [e["name"] for e in bad] == ["encoder.fpn_blocks.0"] and "missing on the jittor side" in bad[0]["reason"]


def test_compare_results_name_only_on_candidate_side_fails(tmp_path):
    """Hole: the base side decided what was compared; a name only Jittor records was ignored."""
    th = load_thresholds()
    b, c = str(tmp_path / "T64.npz"), str(tmp_path / "J64.npz")
    _fake(b, "torch", "float64")
    _fake(c, "jittor", "float64")
    def extra(arrays, meta):
        arrays["int/decoder.extra"] = np.ones(3)
        arrays["out/aux_extra"] = np.ones(3)
        meta["order"]["intermediates"] = meta["order"]["intermediates"] + ["decoder.extra"]
        meta["order"]["outputs"] = meta["order"]["outputs"] + ["aux_extra"]
    _edit(c, extra)
    res = RC.compare_results("forward", "float64", b, c, None, th, cand_shared={})
    bad = {e["name"]: e for e in res["entries"] if not e["passed"]}
    assert set(bad) == {"decoder.extra", "outputs.aux_extra"}
    assert all("only on the jittor side" in e["reason"] for e in bad.values())


def test_shared_decisions_still_judge_the_candidates_own(tmp_path):
    """Hole: with --share-decisions Jittor's own top-k was never computed, so a bug in its
    selection was invisible.  Now its own choice (note/topk_own) is judged against the base's
    with the exact scores: a far-off own selection fails although the shared one was used."""
    th = load_thresholds()
    b, c, r = (str(tmp_path / f"{x}.npz") for x in ("T32", "J32", "T64"))
    for path, be, seed in ((b, "torch", 1), (c, "jittor", 2), (r, "torch", 0)):
        _fake(path, be, "float64", noise=1e-7 if seed else 0.0, seed=seed)
    scores = np.random.default_rng(5).standard_normal((2, 40))
    top = np.argsort(-scores, 1)[:, :6]
    for path, own in ((b, None), (c, top[:, ::-1].copy()), (r, None)):
        def notes(arrays, meta, path=path, own=own):
            arrays["int/decoder.enc_topk_index"] = top
            arrays["note/topk_scores"] = scores + (1e-7 if path == b else 0.0)
            if own is not None:
                arrays["note/topk_own"] = own      # the candidate's own choice: the order reversed
        _edit(path, notes)
    res = RC.compare_results("forward", "float32", b, c, r, th, cand_shared={"topk": True})
    e = next(e for e in res["entries"] if e["name"] == "decoder.enc_topk_index")
    assert e["shared"] and not e["passed"] and e["classification"]["kind"] == "flip"
    _edit(c, lambda arrays, meta: arrays.update({"note/topk_own": top}))     # its own choice agrees
    res = RC.compare_results("forward", "float32", b, c, r, th, cand_shared={"topk": True})
    e = next(e for e in res["entries"] if e["name"] == "decoder.enc_topk_index")
    assert e["passed"] and e["rule"] == "exact"


def test_grad_order_is_backward():
    names = ["backbone.a", "backbone.b", "decoder.x", "decoder.y", "encoder.p"]
    assert RC._grad_order(names) == ["decoder.y", "decoder.x", "encoder.p", "backbone.b", "backbone.a"]


# --- runner: usage and environment errors (no worker starts) --------------------------------------

def _args(tmp_path, **kw):
    base = dict(stage="forward", config="smoke", dtype="float32", device="cpu", data=None, weights=None,
                batch_size=None, seed=0, out=str(tmp_path / "run"), torch_python=None, jittor_python=None,
                share_decisions=False, no_reference=False, verbose=False, thresholds=None, keep_arrays=False,
                timeout=None, inject_fault=[], fault_side="jittor", candidate_backend="jittor")
    base.update(kw)
    return argparse.Namespace(**base)


def test_missing_environment_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RTDETR_PARITY_JITTOR_PYTHON", raising=False)
    rc = R.run(_args(tmp_path, jittor_python=str(tmp_path / "no" / "python")))
    err = capsys.readouterr().err
    assert rc == 2
    assert "jittor environment missing" in err and "[jittor]" in err
    assert not os.path.exists(tmp_path / "run" / "result.json")


def test_missing_environment_via_env_var(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RTDETR_PARITY_TORCH_PYTHON", str(tmp_path / "nothing"))
    rc = R.run(_args(tmp_path))
    assert rc == 2 and "RTDETR_PARITY_TORCH_PYTHON" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    assert R.run(_args(tmp_path, config="nope")) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert R.run(_args(tmp_path, inject_fault=["weight:not.a.weight:scale=2"])) == 2
    assert "no weight named" in capsys.readouterr().err
    assert R.run(_args(tmp_path, stage="train")) == 2
    assert R.run(_args(tmp_path, batch_size=0)) == 2


def test_stale_passing_result_is_removed_on_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "pass", "passed": True}))
    torch_py = os.environ.get("RTDETR_PARITY_TORCH_PYTHON") or os.path.join(repo_root(), ".venvs", "torch", "bin", "python")
    if not os.path.exists(torch_py):
        pytest.skip("needs an interpreter path that exists for the torch side")
    # the interpreter exists but is not a Python: the pre-flight fails -> exit 2, error result
    fake = tmp_path / "fakepy"
    fake.write_text("#!/bin/sh\necho 'no python here' >&2\nexit 3\n")
    fake.chmod(0o755)
    rc = R.run(_args(tmp_path, jittor_python=str(fake), torch_python=torch_py))
    assert rc == 2
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "error" and res["passed"] is False and res["error"]["side"] == "jittor"
    assert "ERROR" in (out / "summary.md").read_text().upper()


def test_stale_result_removed_even_on_early_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "pass", "passed": True}))
    (out / "summary.md").write_text("PASS")
    rc = R.run(_args(tmp_path, jittor_python=str(tmp_path / "missing")))
    assert rc == 2
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "error" and res["passed"] is False and "environment missing" in res["error"]["message"]


def test_float64_run_skipped_only_over_budget():
    """--dtype both: the Jittor float64 run is skipped (verdict float32-only, provisional) only
    when its estimate from the PyTorch float64 run exceeds --float64-budget; 0 never skips."""
    from parity.sides.jobs import Job
    from parity.commands.forward_steps import J64_OVER_T64, float64_too_long as _float64_too_long
    t64 = Job("T64", "ref", "torch", "python", "float64", "grad", "x.npz")
    t64.wall = 100.0
    assert _float64_too_long(t64, 100.0 * J64_OVER_T64 + 1) is None
    why = _float64_too_long(t64, 600.0)
    assert why and f"~{100.0 * J64_OVER_T64 / 60:.0f} min" in why and "600 s" in why
    assert _float64_too_long(t64, 0) is None
