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
    assert doc["schema"] == 1 and doc["kind"] == "parity-bench"
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
