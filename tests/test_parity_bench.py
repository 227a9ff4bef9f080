"""``parity bench``: every measure for both backends, ratios, sane statistics.

Speed itself is never asserted (no timed targets in unit tests).  Cross-environment: runs
from the PyTorch environment and starts the Jittor one; a missing environment FAILS.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, env_python
from parity.workers.op_families import FAMILIES

pytestmark = pytest.mark.torch


def parity(*argv, timeout=3600):
    env = dict(os.environ)
    env["RTDETR_PARITY_TORCH_PYTHON"] = env_python("torch")
    env["RTDETR_PARITY_JITTOR_PYTHON"] = env_python("jittor")
    return subprocess.run([env_python("torch"), "-m", "parity", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_smoke_writes_every_measure_for_both_backends(tmp_path):
    out = tmp_path / "bench"
    r = parity("bench", "--config", "smoke", "--repeat", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == 2 and doc["kind"] == "parity-bench"
    assert doc["settings"]["repeat"] == 2 and doc["settings"]["modes"] == ["eval", "train"]
    (run,) = doc["runs"]
    assert run["config"] == "smoke" and run["size"] == [96, 160] and run["batch"] == 1
    expected = {"eval_forward", "train_step", "eval_first_call", "train_first_call", "eval_startup",
                "train_startup", "eval_peak_rss", "train_peak_rss"}
    assert set(run["measures"]) == expected
    for name, m in run["measures"].items():
        assert m["unit"] in ("ms", "s", "MB") and m["kind"] in ("latency", "warmup", "memory")
        for be in ("torch", "jittor"):
            st = m[be]
            assert st["min"] > 0 and st["max"] > 0 and st["median"] > 0, (name, be, st)
            assert st["min"] <= st["median"] <= st["max"], (name, be, st)
        assert m["ratio"] is not None and m["ratio"] > 0
        assert m["ratio"] == pytest.approx(m["jittor"]["median"] / m["torch"]["median"])
    assert len(run["measures"]["eval_forward"]["torch"]["samples"]) == 2
    assert len(run["measures"]["train_step"]["jittor"]["samples"]) == 2
    for be in ("torch", "jittor"):
        b = run["backends"][be]
        assert b["device"] == "cpu" and b["threads"]["threads"] >= 1 and b["versions"][be]
    md = (out / "bench.md").read_text()
    assert "eval_forward" in md and "Jittor/PyTorch" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train_step" in r.stdout


def test_bench_bad_input_is_one_line_exit_2(tmp_path):
    out = tmp_path / "bench"
    r = parity("bench", "--config", "smoke", "--size", "100", "--out", str(out), timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "multiples of 32" in lines[0]
    assert not (out / "bench.json").exists()


def _profile_file_ok(path, backend, mode):
    prof = json.loads(path.read_text())
    assert prof["backend"] == backend and prof["mode"] == mode and prof["total_ms"] > 0
    fams = prof["by_family"]
    assert {f["family"] for f in fams} <= set(FAMILIES)
    assert sum(f["total_ms"] for f in fams) == pytest.approx(prof["total_ms"], rel=1e-9)
    assert sum(f["percent"] for f in fams) == pytest.approx(100.0)
    assert prof["top_ops"] and prof["by_op"] and all(o["family"] in FAMILIES for o in prof["by_op"])
    return {f["family"]: f["total_ms"] for f in fams}


def test_bench_profile_writes_both_sides_per_op_families(tmp_path):
    out = tmp_path / "bench"
    r = parity("bench", "--config", "smoke", "--repeat", "1", "--warmup", "1", "--profile", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    (run,) = doc["runs"]
    for mode in ("eval", "train"):
        fams = {be: _profile_file_ok(out / f"profile_smoke_{mode}_{be}.json", be, mode) for be in ("torch", "jittor")}
        for be in ("torch", "jittor"):
            side = run["profile"][mode][be]
            assert side["file"] == f"profile_smoke_{mode}_{be}.json" and side["by_family"]
            assert fams[be].get("convolution", 0) > 0 and fams[be].get("matmul", 0) > 0
        if mode == "train":        # the AdamW step, found by scope on both sides
            assert fams["torch"].get("optimiser", 0) > 0 and fams["jittor"].get("optimiser", 0) > 0
    md = (out / "bench.md").read_text()
    assert md.count("| family | PyTorch ms | % | Jittor ms | % | J−T ms |") == 2
    assert "Slowest PyTorch ops, smoke train" in md and "Slowest Jittor ops, smoke eval" in md


def test_bench_profile_with_one_backend_profiles_that_one(tmp_path):
    out = tmp_path / "bench"
    r = parity("bench", "--config", "smoke", "--backend", "torch", "--mode", "eval", "--repeat", "1", "--warmup",
               "1", "--profile", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _profile_file_ok(out / "profile_smoke_eval_torch.json", "torch", "eval")
    assert not (out / "profile_smoke_eval_jittor.json").exists()
    md = (out / "bench.md").read_text()
    assert "Slowest PyTorch ops, smoke eval" in md and "Slowest Jittor ops" not in md
