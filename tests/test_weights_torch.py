"""weights_convert with PyTorch checkpoints (torch env), and the cross-env round trip
torch -> Jittor -> torch (the Jittor steps run in the Jittor env, started from here)."""
from __future__ import annotations

import json
import os
import subprocess
from collections import OrderedDict

import numpy as np
import pytest

from conftest import HAS_TORCH, REPO, env_python
from weights_convert import WeightsError, read_weights, write_weights
from weights_helpers import assert_bit_exact, assert_user_error, files_in, run_cli, seeded

pytestmark = pytest.mark.torch
# This file's name (test_weights_*) gets it collected in both environments; its tests are
# for the torch env only (deselected elsewhere by -m "not torch").  Collect nothing where
# torch is absent, so conftest's framework check sees no torch-marked item there.
__test__ = HAS_TORCH


def _torch_sd(w):
    import torch
    return OrderedDict((k, torch.from_numpy(v.copy())) for k, v in w.items())


def _load_pth(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_torch_sd_equal(got, want):
    import torch
    assert list(got) == list(want)
    for k in want:
        assert isinstance(got[k], torch.Tensor)
        assert got[k].dtype == want[k].dtype and tuple(got[k].shape) == tuple(want[k].shape), k
        assert got[k].numpy().tobytes() == want[k].numpy().tobytes(), f"{k}: bits differ"


# The Jittor side of the round trip, run with the Jittor env's python:
#   jt.load(our .pkl) -> dict of numpy; Module.load(our .pkl) into a module mirroring the
#   spec (as a Jittor model has it: no num_batches_tracked); values checked against the
#   seeded weights *inside* Jittor; then Module.save -> a real Jittor file (Vars).
JITTOR_SIDE = r"""
import json, os, sys
os.environ["nvcc_path"] = ""
sys.path.insert(0, sys.argv[1])
import numpy as np
import jittor as jt
from rtdetr_core.init import seeded_weights
from rtdetr_core.param_spec import param_spec
preset, src, dst = sys.argv[2:5]

class Node(jt.nn.Module):
    pass

root = Node()
for e in param_spec(preset):
    if e.name.endswith("num_batches_tracked"):
        continue                    # Jittor's BatchNorm has none
    *parents, leaf = e.name.split(".")
    m = root
    for p in parents:
        if p not in m.__dict__:
            setattr(m, p, Node())
        m = getattr(m, p)
    setattr(m, leaf, jt.zeros(e.shape, "float32"))

loaded = jt.load(src)
ref = seeded_weights(preset, 3)
res = {"jt_load_type": type(loaded).__name__,
       "jt_load_all_ndarray": all(type(v) is np.ndarray for v in loaded.values()),
       "jt_load_equal": list(loaded) == list(ref) and all(
           loaded[k].dtype == ref[k].dtype and loaded[k].tobytes() == ref[k].tobytes() for k in ref)}
root.load(src)
sd = root.state_dict()
res["module_keys"] = len(sd)
res["module_equal"] = all(sd[k].numpy().tobytes() == ref[k].tobytes() for k in sd)
root.save(dst)
print("RESULT " + json.dumps(res))
"""


def _run_jittor(preset, src, dst):
    r = subprocess.run([env_python("jittor"), "-c", JITTOR_SIDE, REPO, preset, str(src), str(dst)],
                       capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert r.returncode == 0, f"jittor side failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-3000:]
    assert "failed" not in r.stdout + r.stderr, "Jittor reported a failed parameter load"
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("preset", ["r18vd", "r50vd"])
def test_roundtrip_torch_jittor_torch_bit_exact(tmp_path, capsys, preset):
    import torch
    w = seeded(preset)
    sd = _torch_sd(w)
    torch.save(sd, tmp_path / "src.pth")
    # torch -> jittor (converted in the torch env: reading .pth needs torch)
    rc, out, err = run_cli([tmp_path / "src.pth", tmp_path / "conv.pkl", "--config", preset], capsys)
    assert rc == 0, err
    # in Jittor: jt.load / Module.load our file, then Module.save a real Jittor file
    res = _run_jittor(preset, tmp_path / "conv.pkl", tmp_path / "jittor_saved.pkl")
    n_nbt = sum(k.endswith("num_batches_tracked") for k in w)
    assert res == {"jt_load_type": "dict", "jt_load_all_ndarray": True, "jt_load_equal": True,
                   "module_keys": len(w) - n_nbt, "module_equal": True}
    # jittor -> torch, from the file Jittor itself wrote (Vars, no num_batches_tracked)
    rc, out, err = run_cli([tmp_path / "jittor_saved.pkl", tmp_path / "back.pth", "--config", preset], capsys)
    assert rc == 0, err
    if n_nbt:
        assert f"filled missing num_batches_tracked with int64 0: {n_nbt}" in out
    _assert_torch_sd_equal(_load_pth(tmp_path / "back.pth"), sd)
    # and via safetensors
    rc, out, err = run_cli([tmp_path / "src.pth", tmp_path / "w.safetensors", "--config", preset], capsys)
    assert rc == 0, err
    rc, out, err = run_cli([tmp_path / "w.safetensors", tmp_path / "back2.pth", "--config", preset], capsys)
    assert rc == 0, err
    _assert_torch_sd_equal(_load_pth(tmp_path / "back2.pth"), sd)


def test_written_pth_is_a_plain_state_dict(tmp_path):
    import torch
    w = seeded("smoke")
    write_weights(tmp_path / "w.pth", w)
    sd = torch.load(tmp_path / "w.pth", map_location="cpu", weights_only=True)
    assert type(sd) is OrderedDict
    _assert_torch_sd_equal(sd, _torch_sd(w))
    assert sd["backbone.conv1.conv1_1.norm.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("layout", ["ema", "model-ddp", "state_dict", "ema-ddp-and-model"])
def test_official_layouts(tmp_path, capsys, layout):
    import torch
    w = seeded("smoke")
    sd = _torch_sd(w)
    ddp = OrderedDict(("module." + k, v) for k, v in sd.items())
    decoy = OrderedDict((k, torch.zeros_like(v)) for k, v in sd.items())
    ckpt, want_layout, want_prefix = {
        # official RT-DETR release files: {'ema': {'module': sd, 'updates': n}, ...}
        "ema": ({"ema": {"module": sd, "updates": 123}, "last_epoch": 71}, "ema.module", None),
        "model-ddp": ({"model": ddp, "last_epoch": 3,
                       "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": []}},
                      "model", "module."),
        "state_dict": ({"state_dict": sd}, "state_dict", None),
        # a training checkpoint: the EMA weights win over the raw model (official behaviour)
        "ema-ddp-and-model": ({"model": decoy, "ema": {"module": ddp, "updates": 9}}, "ema.module", "module."),
    }[layout]
    torch.save(ckpt, tmp_path / "official.pth")
    got, info = read_weights(tmp_path / "official.pth", "smoke")
    assert (info["layout"], info["prefix_stripped"]) == (want_layout, want_prefix)
    assert_bit_exact(got, w)
    rc, out, err = run_cli([tmp_path / "official.pth", tmp_path / "conv.pkl", "--config", "smoke"], capsys)
    assert rc == 0, err
    assert f"layout {want_layout}" in out
    got, _ = read_weights(tmp_path / "conv.pkl", "smoke")
    assert_bit_exact(got, w)


def test_official_r50vd_with_frozen_bn_num_batches_tracked(tmp_path, capsys):
    """A checkpoint from non-frozen-BN training carries num_batches_tracked where the
    official r50vd (FrozenBatchNorm2d backbone) has none: dropped and reported."""
    import torch
    w = seeded("r50vd")
    sd = OrderedDict()
    for k, v in _torch_sd(w).items():
        sd["module." + k] = v
        if k.startswith("backbone.") and k.endswith(".running_var"):
            sd["module." + k.replace("running_var", "num_batches_tracked")] = torch.tensor(100)
    torch.save({"ema": {"module": sd, "updates": 1}}, tmp_path / "r50.pth")
    rc, out, err = run_cli([tmp_path / "r50.pth", tmp_path / "r50.safetensors", "--config", "r50vd"], capsys)
    assert rc == 0, err
    assert "dropped num_batches_tracked of FrozenBatchNorm2d layers" in out
    got, _ = read_weights(tmp_path / "r50.safetensors", "r50vd")
    assert_bit_exact(got, w)


def test_malicious_pth_refused(tmp_path, capsys):
    import torch

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": _torch_sd(seeded("smoke")), "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused by torch.load.*system"):
        read_weights(tmp_path / "evil.pth")
    rc, out, err = run_cli([tmp_path / "evil.pth", tmp_path / "out.pkl", "--config", "smoke"], capsys)
    assert_user_error(rc, err, "refused", "system")
    assert not marker.exists()
    assert files_in(tmp_path) == ["evil.pth"]


def test_truncated_and_bogus_pth(tmp_path, capsys):
    write_weights(tmp_path / "full.pth", seeded("smoke"))
    blob = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "full.pth").unlink()
    (tmp_path / "trunc.pth").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    before = files_in(tmp_path)
    for name in ("trunc.pth", "text.pth"):
        rc, out, err = run_cli([tmp_path / name, tmp_path / "out.pkl", "--config", "smoke"], capsys)
        assert_user_error(rc, err, "cannot read PyTorch checkpoint")
    assert files_in(tmp_path) == before


def test_pth_missing_extra_shape_errors(tmp_path, capsys):
    import torch
    sd = _torch_sd(seeded("smoke"))
    del sd["decoder.enc_output.1.bias"]
    sd["decoder.enc_output.2.bias"] = torch.zeros(3)
    sd["decoder.enc_bbox_head.layers.2.weight"] = torch.zeros(5, 64)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    rc, out, err = run_cli([tmp_path / "bad.pth", tmp_path / "out.safetensors", "--config", "smoke"], capsys)
    assert_user_error(rc, err, "1 missing: decoder.enc_output.1.bias", "1 unexpected: decoder.enc_output.2.bias",
                      "1 shape mismatch: decoder.enc_bbox_head.layers.2.weight (file [5,64], spec [4,64])")
    assert not (tmp_path / "out.safetensors").exists()


ADAPTER_SIDE = r"""
import json, os, sys
os.environ["nvcc_path"] = ""
sys.path.insert(0, sys.argv[1])
import numpy as np
from rtdetr_core.config import load_config
from weights_convert import read_weights
backend, wpath, out = sys.argv[2:5]
if backend == "torch":
    from backends.torch_impl.adapter import Adapter
else:
    from backends.jittor_impl.adapter import Adapter
cfg = load_config("smoke")
w, _ = read_weights(wpath, cfg)
# float64: a lossless conversion must agree to rounding; in float32 a near-tie in
# the top-k query selection or a sampling point on a pixel edge can legitimately
# flip between two CPUs and move one query row by 1e-1 (seen on the CI machine).
a = Adapter(cfg, "float64")
a.load_weights(w)
img = np.random.default_rng(0).random((1, 3, 128, 128))
o = a.forward(img)
np.savez(out, pred_logits=o["pred_logits"], pred_boxes=o["pred_boxes"])
print("RESULT ok")
"""


def test_converted_weights_give_same_eval_outputs(tmp_path, capsys):
    """smoke: torch adapter on the source .pth vs jittor adapter on the converted .pkl."""
    import torch
    w = seeded("smoke")
    torch.save({"ema": {"module": _torch_sd(w)}}, tmp_path / "src.pth")
    rc, out, err = run_cli([tmp_path / "src.pth", tmp_path / "conv.pkl", "--config", "smoke"], capsys)
    assert rc == 0, err
    outs = {}
    for backend, py, wfile in (("torch", env_python("torch"), "src.pth"),
                               ("jittor", env_python("jittor"), "conv.pkl")):
        r = subprocess.run([py, "-c", ADAPTER_SIDE, REPO, backend, str(tmp_path / wfile),
                            str(tmp_path / f"{backend}.npz")], capture_output=True, text=True,
                           cwd=REPO, timeout=1800)
        assert r.returncode == 0 and "RESULT ok" in r.stdout, f"{backend}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        outs[backend] = np.load(tmp_path / f"{backend}.npz")
    assert outs["torch"]["pred_logits"].shape == (1, 300, 80) and outs["torch"]["pred_boxes"].shape == (1, 300, 4)
    for k in ("pred_logits", "pred_boxes"):
        assert np.isfinite(outs["torch"][k]).all()
        assert outs["torch"][k].dtype == np.float64 and outs["jittor"][k].dtype == np.float64
        np.testing.assert_allclose(outs["jittor"][k], outs["torch"][k], atol=1e-10, rtol=0, err_msg=k)
