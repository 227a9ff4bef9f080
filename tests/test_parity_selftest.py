"""``parity selftest``: planted porting bugs are caught and localised; a bug that does not
apply exactly once is refused before anything runs.

Runs from the PyTorch environment (marker ``torch``) and starts the Jittor environment
itself (conftest.env_python: a missing environment FAILS).  The ``--fast`` subset (2 bugs:
backbone BN eps, deformable-attention softmax axis; forward stage, float64 only, no baseline)
takes ~1.3 minutes on 2 cores with a warm Jittor cache (measured 75 s; 3 bugs took 3.4 min); the full table is
reports/selftest.md.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from conftest import REPO, env_python
from parity.commands.selftest_patch import PARTS, PatchError, apply_patch, check_patches, load_bugs

pytestmark = pytest.mark.torch


def _selftest(*argv, tmp=None, timeout=900):
    env = dict(os.environ)
    env["RTDETR_PARITY_TORCH_PYTHON"] = env_python("torch")
    env["RTDETR_PARITY_JITTOR_PYTHON"] = env_python("jittor")
    return subprocess.run([env_python("torch"), "-m", "parity", "selftest", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_fast_subset_is_caught_and_localised(tmp_path):
    out = str(tmp_path / "st")
    p = _selftest("--fast", "--no-baseline", "--out", out)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}"
    res = json.load(open(os.path.join(out, "selftest.json")))
    fast = [b.id for b in load_bugs() if b.fast]
    assert 2 <= len(fast) <= 3 and [r["id"] for r in res["bugs"]] == fast
    for r in res["bugs"]:
        assert r["caught"] and r["caught_float64"], r
        assert r["localised"] and r["ok"], r
        # the first divergence names the module the bug was planted in, not just "somewhere"
        assert any(r["first_divergence"].startswith(e) for e in r["expected"]), r
    assert res["passed"] is True and res["summary"]["ok"] == len(fast)
    md = open(os.path.join(out, "selftest.md")).read()
    assert all(f"`{i}`" in md for i in fast)


def _tree(tmp_path, text):
    d = tmp_path / "repo" / "backends" / "jittor_impl"
    d.mkdir(parents=True)
    (d / "m.py").write_text(text)
    return str(tmp_path / "repo")


@pytest.mark.parametrize("text,count", [("a = 1\n", 0), ("x = 1\nx = 1\n", 2)])
def test_patch_must_apply_exactly_once(tmp_path, text, count):
    root = _tree(tmp_path, text)
    with pytest.raises(PatchError, match=f"occurs {count} times"):
        apply_patch(root, "m.py", "x = 1", "x = 2")
    assert open(os.path.join(root, "backends", "jittor_impl", "m.py")).read() == text   # untouched


def test_patch_applies_and_stays_inside_the_backend(tmp_path):
    root = _tree(tmp_path, "x = 1\ny = 2\n")
    apply_patch(root, "m.py", "x = 1", "x = 3")
    assert open(os.path.join(root, "backends", "jittor_impl", "m.py")).read() == "x = 3\ny = 2\n"
    with pytest.raises(PatchError, match="under backends/jittor_impl"):
        apply_patch(root, "../../parity/cli/parser.py", "a", "b")
    with pytest.raises(PatchError, match="no such file"):
        apply_patch(root, "nope.py", "a", "b")


def test_cli_refuses_a_patch_that_does_not_apply(tmp_path):
    bad = tmp_path / "bugs.yaml"
    bad.write_text(yaml.safe_dump({"bugs": [{
        "id": "ghost", "description": "text that is not in the file", "file": "framework.py",
        "old": "this line is not in framework.py", "new": "x", "part": "backbone", "kind": "constant",
        "expected": ["backbone"]}]}))
    out = str(tmp_path / "st")
    p = _selftest("--bugs-file", str(bad), "--out", out, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ghost" in lines[0] and "occurs 0 times" in lines[0], p.stderr
    assert not os.path.exists(out)          # refused before any copy or run


def test_unknown_bug_id_is_a_usage_error(tmp_path):
    p = _selftest("--bugs", "no-such-bug", "--out", str(tmp_path / "st"), timeout=120)
    assert p.returncode == 2 and "unknown id" in p.stderr and "Traceback" not in p.stderr


def test_shipped_bug_list_applies_and_covers_every_part():
    bugs = load_bugs()
    check_patches(bugs)                      # each applies exactly once to this tree
    assert len(bugs) >= 15
    assert {b.part for b in bugs} == set(PARTS)
    assert {"nonsquare", "train", "detect"} <= {t for b in bugs for t in b.tags}
