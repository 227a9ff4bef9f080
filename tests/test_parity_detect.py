"""``parity detect``: both backends on real image files and on a raw ``--input`` tensor.

Cross-environment: runs from the PyTorch environment and starts the Jittor one through the
CLI's workers; a missing environment FAILS (conftest.env_python), never skips.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, env_python

pytestmark = pytest.mark.torch


def _env():
    env = dict(os.environ)
    env["RTDETR_PARITY_TORCH_PYTHON"] = env_python("torch")
    env["RTDETR_PARITY_JITTOR_PYTHON"] = env_python("jittor")
    return env


def parity(*argv, timeout=1200):
    return subprocess.run([env_python("torch"), "-m", "parity", *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _picture(w, h, seed):
    """A smooth picture with a few solid shapes (not noise: JPEG must not matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx / w * 255, yy / h * 255, np.full((h, w), 128.0)], axis=-1)
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        a[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(a.astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    p = d / "colour.png"
    _picture(160, 120, 1).save(p)
    paths.append(str(p))
    p = d / "photo.jpg"
    _picture(200, 150, 2).save(p, quality=90)
    paths.append(str(p))
    p = d / "gray.png"
    _picture(96, 128, 3).convert("L").save(p)
    paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def detect_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "out"
    r = parity("detect", "--config", "smoke", "--image", *images, "--conf", "0.15", "--out", str(out))
    return r, out


def test_detect_images_both_backends_agree(detect_run, images):
    from parity.judge.compare import judge_tensor
    from parity.judge.outputs_match import align_batch
    from parity.judge.thresholds import load_thresholds

    r, out = detect_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SEEDED INIT" in r.stdout                     # no --weights: the output says so
    summary = json.loads((out / "result.json").read_text())
    assert summary["status"] == "ok" and summary["passed"] and summary["weights"]["source"] == "seeded"
    assert "untrained" in summary["weights"]["note"]
    th = load_thresholds().get("forward", "float32", "outputs")
    rt, rj = np.load(out / "raw_torch.npz"), np.load(out / "raw_jittor.npz")
    assert rt["input"].shape == (3, 3, 96, 160) and rt["input"].dtype == np.float32
    np.testing.assert_array_equal(rt["input"], rj["input"])          # the same tensor went to both
    keys = ("pred_logits", "pred_boxes")
    c, b, flip = align_batch({k: rj[k] for k in keys}, {k: rt[k] for k in keys})   # near-tie order flips paired
    for key in keys:
        e = judge_tensor(key, "outputs", c[key], b[key], th=th)
        assert e["passed"], (e, flip)
    gray = rt["input"][2]
    np.testing.assert_array_equal(gray[0], gray[1])                   # grayscale -> RGB replicated
    np.testing.assert_array_equal(gray[0], gray[2])
    assert rt["orig_sizes"].tolist() == [[120, 160], [150, 200], [128, 96]]
    ag = json.loads((out / "agreement.json").read_text())
    assert len(ag["per_image"]) == 3
    for row in ag["per_image"]:
        for k in ("matched", "mean_iou", "max_score_diff", "label_agreement", "agreement"):
            assert k in row
    assert ag["summary"]["n_base"] > 0, "no detections above --conf: the agreement test is vacuous"
    assert ag["summary"]["min_agreement"] >= 0.9
    assert "agreement" in r.stdout and "mean IoU" in r.stdout


def test_detect_json_loads_in_pycocotools(detect_run):
    from pycocotools.coco import COCO

    r, out = detect_run
    assert r.returncode == 0, r.stderr[-2000:]
    gt = COCO(str(out / "images.json"))
    for be in ("torch", "jittor"):
        dets = json.loads((out / f"detections_{be}.json").read_text())
        assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
        assert dets[0]["category_name"]                                # 80 classes -> COCO names
        res = gt.loadRes(str(out / f"detections_{be}.json"))
        assert len(res.getAnnIds()) == len(dets)
        assert set(res.getImgIds()) == {1, 2, 3}


def test_detect_writes_side_by_side_pngs(detect_run):
    r, out = detect_run
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["000_colour.png", "001_photo.png", "002_gray.png"]
    with Image.open(out / pngs[0]) as im:
        assert im.format == "PNG"
        assert im.width > 2 * 160 and im.height > 120                  # two panels + title bar


def test_detect_input_npy_saves_exact_forward_outputs(tmp_path):
    from backends.torch_impl.adapter import Adapter
    from rtdetr_core.config import load_config
    from rtdetr_core.init import seeded_weights

    x = np.random.default_rng(7).random((2, 3, 128, 128), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    r = parity("detect", "--config", "smoke", "--input", str(tmp_path / "x.npy"), "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import torch
    workers = json.loads((out / "result.json").read_text())["workers"]
    old = torch.get_num_threads()
    torch.set_num_threads(workers["torch"]["threads"]["threads"])     # the worker's thread count
    try:
        cfg = load_config("smoke")
        ad = Adapter(cfg)
        ad.load_weights(seeded_weights(cfg, 0))
        ref = ad.forward(x)
    finally:
        torch.set_num_threads(old)
    rt = np.load(out / "raw_torch.npz")
    np.testing.assert_array_equal(rt["input"], x)
    np.testing.assert_array_equal(rt["pred_logits"], ref["pred_logits"])
    np.testing.assert_array_equal(rt["pred_boxes"], ref["pred_boxes"])
    rj = np.load(out / "raw_jittor.npz")
    np.testing.assert_array_equal(rj["input"], x)
    assert rj["pred_logits"].dtype == np.float32 and rj["pred_logits"].shape == ref["pred_logits"].shape
    assert (out / "000_input_0.png").exists()


def _assert_clean_failure(r, out, what):
    assert r.returncode == 2, f"{what}: rc {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("parity: error:"), f"{what}: stderr {r.stderr!r}"
    assert "Traceback" not in r.stdout + r.stderr
    res = out / "result.json"
    if res.exists():                   # the folder may exist, but it must say error
        doc = json.loads(res.read_text())
        assert doc["status"] == "error" and doc["passed"] is False, f"{what}: {doc}"
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "unreadable", "folder", "bad_weights", "preset", "env",
                                  "npy_shape", "npy_dtype", "npy_missing"])
def test_detect_bad_inputs_one_line_exit_2(case, tmp_path, images):
    out = tmp_path / "out"
    img = images[0]
    argv = ["detect", "--config", "smoke", "--out", str(out)]
    if case == "missing":
        argv += ["--image", img, str(tmp_path / "nope.png")]
    elif case == "unreadable":
        (tmp_path / "fake.png").write_text("not an image")
        argv += ["--image", str(tmp_path / "fake.png")]
    elif case == "folder":
        argv += ["--image", str(tmp_path)]
    elif case == "bad_weights":
        (tmp_path / "w.safetensors").write_bytes(b"\x00garbage" * 10)
        argv += ["--image", img, "--weights", str(tmp_path / "w.safetensors")]
    elif case == "preset":
        argv[2] = "no-such-preset"
        argv += ["--image", img]
    elif case == "env":
        argv += ["--image", img, "--jittor-python", str(tmp_path / "no" / "python")]
    elif case == "npy_shape":
        np.save(tmp_path / "x.npy", np.zeros((1, 3, 100, 128), np.float32))
        argv += ["--input", str(tmp_path / "x.npy")]
    elif case == "npy_dtype":
        np.save(tmp_path / "x.npy", np.zeros((1, 3, 128, 128), np.float64))
        argv += ["--input", str(tmp_path / "x.npy")]
    elif case == "npy_missing":
        argv += ["--input", str(tmp_path / "none.npy")]
    r = parity(*argv, timeout=300)
    line = _assert_clean_failure(r, out, case)
    expect = {"missing": "not found", "unreadable": "cannot read image", "folder": "folder",
              "bad_weights": "weights", "preset": "no-such-preset", "env": "jittor environment missing",
              "npy_shape": "multiples of 32", "npy_dtype": "float32", "npy_missing": "not found"}[case]
    assert expect in line, line


def test_detect_worker_failure_leaves_no_success_claim(tmp_path, images):
    """A failure inside a worker (here: --device cuda on a machine without CUDA, or a CUDA
    machine where it works) is one line + exit 2, and the folder says error, not success."""
    out = tmp_path / "out"
    r = parity("detect", "--config", "smoke", "--image", images[0], "--device", "cuda", "--backend", "torch",
               "--out", str(out), timeout=600)
    if r.returncode == 0:          # a CUDA machine: then it must simply have worked
        assert json.loads((out / "result.json").read_text())["status"] == "ok"
        return
    _assert_clean_failure(r, out, "cuda")
    err = json.loads((out / "result.json").read_text())
    assert err["status"] == "error" and "cuda" in err["error"]["message"].lower()
    assert not (out / "raw_torch.npz").exists()
