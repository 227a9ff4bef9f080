"""End to end: ``parity run`` on the smoke preset with both real environments.

Runs from the PyTorch environment (marker ``torch``) and starts the Jittor environment
itself; a missing environment FAILS (conftest.env_python), it is never skipped.
Each run writes to a tmp folder; results are cached per module so that several assertions
share one run.  Wall time on 2 CPU cores with a warm Jittor cache: ~25 minutes in total
(the first float64 Jittor grad run compiles its kernels once: ~8 more minutes).
The parity-r50vd acceptance runs (576x640, batch 2, default ``--dtype both``; measured on
2 cores at 640x640: float32 forward 2 min, grad 2.5 min; float64 forward 11 min, grad 39 min --
Jittor's float64 CPU kernels are ~17x slower than PyTorch's) are opt-in: ``RTDETR_PARITY_SLOW=1`` (marker ``slow``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, env_python

pytestmark = pytest.mark.torch

_CACHE = {}


def parity_run(tmp_root, name, *extra, stage="forward", dtype="float32"):
    """Run ``python -m parity run`` in the torch env; returns (rc, stdout, stderr, result or None)."""
    key = (name, stage, dtype, extra)
    if key in _CACHE:
        return _CACHE[key]
    out = os.path.join(tmp_root, f"{name}-{stage}-{dtype}")
    env = dict(os.environ)
    env["RTDETR_PARITY_TORCH_PYTHON"] = env_python("torch")
    env.setdefault("RTDETR_PARITY_JITTOR_PYTHON", env_python("jittor"))
    cmd = [env_python("torch"), "-m", "parity", "run", "--stage", stage, "--config", "smoke", "--dtype", dtype,
           "--out", out, *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    res_path = os.path.join(out, "result.json")
    res = json.load(open(res_path)) if os.path.exists(res_path) else None
    _CACHE[key] = (p.returncode, p.stdout, p.stderr, res)
    return _CACHE[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parity_e2e"))


def _explain(rc, out, err, res):
    fd = (res or {}).get("first_divergence")
    return f"rc={rc}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}\nfirst divergence: {fd}"


# --- the smoke preset passes, both stages, both dtypes ---------------------------------------------

@pytest.mark.parametrize("stage", ["forward", "grad"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_smoke_passes(root, stage, dtype):
    rc, out, err, res = parity_run(root, "smoke", stage=stage, dtype=dtype)
    assert rc == 0, _explain(rc, out, err, res)
    assert res["status"] == "pass" and res["passed"] is True and res["first_divergence"] is None
    assert res["config"] == "smoke" and res["dtype"] == dtype and res["stage"] == stage
    groups = set(res["groups"])
    assert {"intermediates", "outputs", "decisions"} <= groups
    if stage == "grad":
        assert {"losses", "grads", "step"} <= groups
        assert res["groups"]["grads"]["n"] > 400 and res["grads_by_module"]
    else:   # eval pass, then a train-mode pass (BN batch statistics) over the same intermediates
        ev = [t["name"] for t in res["tensors"] if t["group"] == "intermediates"]
        tr = [t["name"] for t in res["tensors"] if t["group"] == "train_intermediates"]
        assert len(ev) > 40 and tr == ["train." + n for n in ev]
        assert res["groups"]["train_outputs"]["n"] > res["groups"]["outputs"]["n"]     # + aux outputs
        assert [t["name"] for t in res["tensors"] if t["group"] == "decisions"] == \
            ["decoder.enc_topk_index", "train.decoder.enc_topk_index"]
    if dtype == "float32":
        # J32s: Jittor re-run with PyTorch's decisions after its own flipped by a near-tie
        assert res["labels"] in ({"cand": "J32", "base": "T32", "ref": "T64"},
                                 {"cand": "J32s", "base": "T32", "ref": "T64"})
        assert (res["labels"]["cand"] == "J32s") == bool(res.get("decisions_rerun"))
        assert res["groups"]["outputs"].get("max_floor") is not None      # the float64 floor was measured
        for e in res["tensors"]:                                          # flips classified, with their gap
            if e["group"] == "decisions" and e["rule"] != "exact":
                assert e["rule"] in ("order", "tie") and "gap" in e["flip"]
    else:
        assert res["labels"] == {"cand": "J64", "base": "T64"}
    md = open(os.path.join(res["out"], "summary.md")).read()
    assert "PASS" in md
    assert "PASS:" in out or "PASS (float32 only, PROVISIONAL" in out


@pytest.mark.parametrize("stage", ["forward", "grad"])
def test_default_dtype_is_both_with_float64_arbiter(root, stage):
    """No --dtype: float64 (J64 vs T64, under one set of decisions, each side's own choices
    judged) arbitrates and float32 is judged against its floor; kink-like float32 gradient
    excesses are listed apart, never silently passed."""
    out = os.path.join(root, f"both-{stage}")
    env = dict(os.environ, RTDETR_PARITY_TORCH_PYTHON=env_python("torch"),
               RTDETR_PARITY_JITTOR_PYTHON=env_python("jittor"))
    # --float64-budget 0: the budget skips J64 when T64's wall time x 33 exceeds 1800 s, and on
    # a loaded machine T64 alone took long enough (the suite beside a training run, 2026-12-04)
    p = subprocess.run([env_python("torch"), "-m", "parity", "run", "--stage", stage, "--float64-budget", "0",
                        "--out", out], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    res = json.load(open(os.path.join(out, "result.json")))
    assert p.returncode == 0, _explain(p.returncode, p.stdout, p.stderr, res)
    assert res["dtype"] == "both" and res["passed"] and set(res["runs"]) == {"float64", "float32"}
    assert res["runs"]["float64"]["labels"] == {"cand": "J64", "base": "T64"}
    assert res["runs"]["float64"]["passed"] and "float64 arbiter" in res["verdict_basis"]
    for x in res["explained"]:
        assert x["group"] in ("grads", "step") and x["evidence"].split(":")[0] in ("kink", "adamw", "amplified", "noisy")
    md = open(os.path.join(out, "summary.md")).read()
    assert "float64 + float32: **PASS**" in md and "Verdict rests on" in md
    # each comparison's section shows the run's wall time, thresholds file and its own sides
    assert md.count(f"Total wall time {res['wall_s']:.1f}s. Thresholds: `{res['thresholds_file']}`") == 2
    assert "| J64 (cand) | jittor | float64 |" in md and "| J32" in md and "Thresholds: `None`" not in md


def test_forward_share_decisions_covers_both_passes(root):
    """--share-decisions feeds PyTorch's eval AND train-mode top-k selections to Jittor."""
    rc, out, err, res = parity_run(root, "shared", "--share-decisions", stage="forward", dtype="float32")
    assert rc == 0, _explain(rc, out, err, res)
    dec = {t["name"]: t for t in res["tensors"] if t["group"] == "decisions"}
    assert set(dec) == {"decoder.enc_topk_index", "train.decoder.enc_topk_index"}
    assert all(t["shared"] and t["passed"] for t in dec.values())


def test_smoke_batch1_grad_float64(root):
    """Batch size 1 (the reference experiment's): torch 2.13's CPU BatchNorm backward gets a
    channels-last grad_output at batch 1 and was 3x off on the decoder input projections
    until backends/torch_impl/normalization.BatchNorm2d handed it a dense gradient; Jittor was
    right.  float64: every gradient and the optimiser step agree (<= 1e-7 / 1e-9)."""
    rc, out, err, res = parity_run(root, "batch1", "--batch-size", "1", stage="grad", dtype="float64")
    assert rc == 0, _explain(rc, out, err, res)
    assert res["batch_size"] == 1 and res["passed"] is True
    assert res["groups"]["grads"]["failed"] == 0 and res["groups"]["step"]["failed"] == 0


# --- deliberately broken variants are caught and localised --------------------------------------

FAULTS = {
    "backbone": ("weight:backbone.res_layers.1.blocks.0.branch2a.conv.weight:noise=1e-3", "backbone.res_layers.1"),
    "encoder": ("weight:encoder.fpn_blocks.0.conv1.conv.weight:scale=1.001", "encoder.fpn_blocks.0"),
    "decoder": ("weight:decoder.decoder.layers.3.linear1.weight:noise=1e-3", "decoder.decoder.layers.3"),
    "upsample": ("upsample:bilinear", "encoder.fpn_blocks.0"),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_injected_fault_named_as_first_divergence(root, fault, dtype):
    spec, module = FAULTS[fault]
    rc, out, err, res = parity_run(root, f"fault-{fault}", "--inject-fault", spec, dtype=dtype)
    assert rc == 1, _explain(rc, out, err, res)
    assert res["status"] == "fail" and res["passed"] is False
    fd = res["first_divergence"]
    assert fd["module"] == module, _explain(rc, out, err, res)
    assert res["faults"] == [spec] and res["fault_side"] == "jittor"
    assert f"first divergence: {module}" in out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_injected_fault_in_grad_stage(root, dtype):
    spec, module = FAULTS["decoder"]
    rc, out, err, res = parity_run(root, "fault-decoder", "--inject-fault", spec, stage="grad", dtype=dtype)
    assert rc == 1, _explain(rc, out, err, res)
    assert res["first_divergence"]["module"] == module, _explain(rc, out, err, res)
    assert res["groups"]["grads"]["failed"] > 0


def test_buffer_only_fault_fails_the_forward_stage(root):
    """Hole: the forward stage's train-mode pass never compared BatchNorm buffers, so a wrong
    momentum (it changes nothing but the running statistics) passed.  It now fails there."""
    rc, out, err, res = parity_run(root, "fault-bn", "--inject-fault", "bn-momentum:0.2", dtype="float64")
    assert rc == 1, _explain(rc, out, err, res)
    fd = res["first_divergence"]
    assert fd["group"] == "train_buffers" and fd["name"].endswith("running_mean"), fd
    assert res["groups"]["train_intermediates"]["failed"] == 0          # only the buffers differ
    assert res["groups"]["train_buffers"]["failed"] > 0


# Code-level faults that leave the forward pass alone: only the grad stage's gradients (a stop_grad
# on the FPN's upsampled branch) or only its optimiser step (4 % more learning rate) move, and
# the first divergence must say which group.  float64: the arbiter, and the cheaper run.
GRAD_ONLY_FAULTS = {"backward-detach": ("code:backward-detach", "grads"),
                    "lr-scale": ("optim:lr-scale=1.04", "step")}


@pytest.mark.parametrize("fault", list(GRAD_ONLY_FAULTS))
def test_grad_only_fault_names_its_group(root, fault):
    spec, group = GRAD_ONLY_FAULTS[fault]
    rc, out, err, res = parity_run(root, f"fault-{fault}", "--inject-fault", spec, stage="grad", dtype="float64")
    assert rc == 1, _explain(rc, out, err, res)
    assert res["first_divergence"]["group"] == group, _explain(rc, out, err, res)
    g = res["groups"]
    for upstream in ("intermediates", "outputs", "losses") + (("grads",) if group == "step" else ()):
        assert g[upstream]["failed"] == 0, (upstream, _explain(rc, out, err, res))
    assert g[group]["failed"] > 0
    if fault == "backward-detach":       # cut branch: AIFI and the lateral conv lose a gradient path
        bad = {m["module"] for m in res["grads_by_module"] if m["failed"]}
        assert {"encoder.encoder.0", "encoder.lateral_convs.0"} <= bad, bad


# --- usage and environment errors: exit 2, clear message, no passing result --------------------------

def _no_pass(res):
    assert res is None or (res["status"] == "error" and res["passed"] is False)


def test_missing_environment(root):
    rc, out, err, res = parity_run(root, "noenv", "--jittor-python", "/nonexistent/jittor/bin/python")
    assert rc == 2, _explain(rc, out, err, res)
    assert "[jittor]" in err and "jittor environment missing" in err and "/nonexistent/jittor/bin/python" in err
    _no_pass(res)


def test_corrupt_weights(root, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}garbage")
    rc, out, err, res = parity_run(root, "badweights", "--weights", str(bad))
    assert rc == 2, _explain(rc, out, err, res)
    assert "weights" in err and str(bad) in err
    _no_pass(res)


def test_weights_of_another_config(root, tmp_path):
    from rtdetr_core.init import seeded_weights
    from weights_convert import write_weights
    p = str(tmp_path / "r18.safetensors")
    write_weights(p, seeded_weights("r18vd", 0))
    rc, out, err, res = parity_run(root, "otherweights", "--weights", p)
    assert rc == 2, _explain(rc, out, err, res)
    assert "do not match config 'smoke'" in err
    _no_pass(res)


def test_config_mismatch_between_sides(root):
    rc, out, err, res = parity_run(root, "cfgmismatch", "--inject-fault", "config:decoder.num_queries=200")
    assert rc == 2, _explain(rc, out, err, res)
    assert "[jittor]" in err and "config mismatch" in err
    _no_pass(res)
    assert res["error"]["side"] == "jittor" and res["error"]["cause"] == "config mismatch"


@pytest.mark.parametrize("kind,expect", [("raise", "RuntimeError: injected crash"), ("abort", "SIGABRT")])
def test_backend_crash(root, kind, expect):
    rc, out, err, res = parity_run(root, f"crash-{kind}", "--inject-fault", f"crash:{kind}", "--no-reference")
    assert rc == 2, _explain(rc, out, err, res)
    assert "[jittor]" in err and "crash" in err and expect in err
    _no_pass(res)
    assert res["error"]["cause"] == "backend crash"


# --- harness self-test, independent of the Jittor backend's state: torch against torch ------------

def test_torch_against_torch_is_exact(root):
    rc, out, err, res = parity_run(root, "self", "--candidate-backend", "torch", dtype="float64")
    assert rc == 0, _explain(rc, out, err, res)
    assert all(e["rule"] == "exact" for e in res["tensors"])


@pytest.mark.parametrize("fault", ["backbone", "encoder", "decoder"])
def test_fault_localised_torch_against_torch(root, fault):
    spec, module = FAULTS[fault]
    rc, out, err, res = parity_run(root, f"self-fault-{fault}", "--candidate-backend", "torch",
                                   "--inject-fault", spec, dtype="float64")
    assert rc == 1, _explain(rc, out, err, res)
    fd = res["first_divergence"]
    assert fd["module"] == module and fd["upstream_max_err"] == 0.0, _explain(rc, out, err, res)


# --- parity-r50vd acceptance (opt-in: RTDETR_PARITY_SLOW=1) -------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", ["forward", "grad"])
def test_r50vd_passes(root, stage):
    if os.environ.get("RTDETR_PARITY_SLOW") != "1":
        pytest.skip("parity-r50vd runs are opt-in: set RTDETR_PARITY_SLOW=1")
    out = os.path.join(root, f"r50-{stage}")
    env = dict(os.environ)
    env["RTDETR_PARITY_TORCH_PYTHON"] = env_python("torch")
    env.setdefault("RTDETR_PARITY_JITTOR_PYTHON", env_python("jittor"))
    cmd = [env_python("torch"), "-m", "parity", "run", "--stage", stage, "--config", "parity-r50vd",
           "--batch-size", "2", "--out", out]   # the default: --dtype both, own decisions
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=4 * 3600)
    res = json.load(open(os.path.join(out, "result.json")))
    assert p.returncode == 0, _explain(p.returncode, p.stdout, p.stderr, res)
    assert res["status"] == "pass"
