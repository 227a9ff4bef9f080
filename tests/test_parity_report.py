"""``parity report``: renders real run folders (a small train run of both backends and a
forward run) into report.md / report.json / valid PNGs whose numbers are the runs' own.

Cross-environment: the runs start the Jittor environment (a missing one FAILS).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import REPO, env_python

pytestmark = pytest.mark.torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parity(*argv, timeout=1800):
    env = dict(os.environ)
    env["RTDETR_PARITY_TORCH_PYTHON"] = env_python("torch")
    env["RTDETR_PARITY_JITTOR_PYTHON"] = env_python("jittor")
    return subprocess.run([env_python("torch"), "-m", "parity", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(r, codes=(0,)):
    assert r.returncode in codes, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    train, fwd, rep = str(base / "train"), str(base / "fwd"), str(base / "rep")
    r = parity("run", "--stage", "train", "--config", "smoke", "--limit-images", "2", "--limit-val", "2",
               "--batch-size", "2", "--epochs", "2", "--eval-every", "1", "--out", train)
    _ok(r)
    r = parity("run", "--stage", "forward", "--config", "smoke", "--batch-size", "1", "--dtype", "float32", "--out", fwd)
    _ok(r, (0, 1))                # the verdict is the forward stage's business; the folder is what we render
    r_one = parity("report", train)
    r_two = parity("report", train, fwd, "--out", rep, "--title", "test report")
    return {"train": train, "fwd": fwd, "rep": rep, "r_one": r_one, "r_two": r_two}


def _valid_png(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert float(np.std(img)) > 0.01, f"{path} is blank"


def test_single_run_report_defaults_into_the_run_folder(rendered):
    _ok(rendered["r_one"])
    out = os.path.join(rendered["train"], "report")
    for f in ("report.md", "report.json", "train_loss_curves.png", "train_rel_diff_epoch.png",
              "train_rel_diff_iteration.png", "train_term_curves.png", "train_map.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "report.json")) as fh:
        doc = json.load(fh)
    for img in doc["runs"][0]["images"]:
        _valid_png(os.path.join(out, img))


def test_report_numbers_are_the_runs_numbers(rendered):
    _ok(rendered["r_two"])
    with open(os.path.join(rendered["rep"], "report.json")) as fh:
        doc = json.load(fh)
    with open(os.path.join(rendered["train"], "result.json")) as fh:
        res = json.load(fh)
    tr, fw = doc["runs"]
    assert tr["kind"] == "train" and fw["kind"] == "forward"
    assert tr["status"] == res["status"] and tr["verdict"] == res["verdict"]
    assert tr["checks"] == res["checks"]
    assert tr["map"] == res["map"]
    cb = res["metrics"]["cand_base"]
    assert tr["lockstep"] == cb["lockstep"] and tr["drift"] == cb["drift"]
    assert [e["total_rel"] for e in tr["epochs"]] == [e["total_rel"] for e in cb["epochs"]]
    assert [e["base_total"] for e in tr["epochs"]] == [e["base_total"] for e in cb["epochs"]]
    assert tr["floor"]["param_drift"] == res["metrics"]["base_ref"]["param_drift"]
    for a, b in zip(tr["sides"], res["sides"]):
        assert (a["label"], a["peak_rss_mb"], a["wall_s"], a["epoch_seconds"]) == \
               (b["label"], b["peak_rss_mb"], b["wall_s"], b["epoch_seconds"])
    # forward run: per-module errors in forward order, verbatim
    with open(os.path.join(rendered["fwd"], "result.json")) as fh:
        fres = json.load(fh)
    ents = [e for e in fres["tensors"] if e["group"] in ("intermediates", "outputs")]
    assert [e["name"] for e in fw["forward_errors"]] == [e["name"] for e in ents]
    assert [e["err"] for e in fw["forward_errors"]] == [e.get("err") for e in ents]
    assert fw["forward_errors"][0]["name"] == "backbone.conv1"
    for run in doc["runs"]:
        assert run["images"]
        for img in run["images"]:
            _valid_png(os.path.join(rendered["rep"], img))
    assert "r2_forward_forward_errors.png" in fw["images"]


def test_report_markdown_shows_curves_tables_and_environment(rendered):
    _ok(rendered["r_two"])
    with open(os.path.join(rendered["rep"], "report.md")) as fh:
        md = fh.read()
    with open(os.path.join(rendered["train"], "result.json")) as fh:
        res = json.load(fh)
    assert md.startswith("# test report")
    for needle in ("![loss curves](r1_train_loss_curves.png)", "## Checks", "## Lock-step", "## COCO mAP (val)",
                   "## Per-epoch difference", "## Parameter drift", "## Sides: time and memory", "## Environment",
                   "![forward error per module](r2_forward_forward_errors.png)", res["verdict"],
                   res["config_digest"], "AMD" if "AMD" in str(res["env"]["host"].get("cpu_model")) else "host:"):
        assert needle in md, needle
    # per-epoch table: one row per epoch, both backends' mean loss as logged
    rows = [ln for ln in md.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(rows) >= 2
    for s in res["sides"]:
        assert f"| {s['label']} | {s['backend']} | {s['dtype']} |" in md
    # mAP at both evaluated epochs, with J32 - T32; start and end of every side
    ap = md.split("AP at every evaluated epoch:")[1].split("![")[0]
    assert "| epoch | T32 AP | J32 AP | T64 AP | AP J32 - T32 | AP T64 - T32 |" in ap
    assert sum(ln.startswith(("| 1 |", "| 2 |")) for ln in ap.splitlines()) == 2
    start = md.split("## Start and end")[1].split("## ")[0]
    for s in res["sides"]:
        assert f"| {s['label']} | {s['model']['parameters']} | 300 | 6 | 100 |" in start


def test_report_of_a_folder_that_is_not_a_run_exits_2(tmp_path):
    r = parity("report", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "no result.json" in r.stderr and "Traceback" not in r.stderr


def test_report_paths_are_repo_relative_inside_the_repo(tmp_path):
    """A committed report must not carry this machine's absolute paths."""
    from parity.report.fmt import shown_path
    assert shown_path(os.path.join(REPO, "reports", "runs", "x")) == os.path.join("reports", "runs", "x")
    assert shown_path(os.path.join(REPO, "parity", "thresholds.yaml")) == os.path.join("parity", "thresholds.yaml")
    outside = str(tmp_path / "run")
    assert shown_path(outside) == outside
    assert shown_path(REPO + "-other/x") == REPO + "-other/x"      # a sibling folder is not inside
