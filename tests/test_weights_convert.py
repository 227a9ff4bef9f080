"""weights_convert without any framework: safetensors / npz / Jittor .pkl (restricted reader
and writer), validation against the spec, layouts, atomic output, a torch file without torch.
Malicious pickles and the CLI's user errors: test_weights_convert_cli.py.

Runs in both environments (numpy 2 in the torch env, numpy 1.26 in the Jittor env).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest

from rtdetr_core.param_spec import param_spec
from weights_convert import WeightsError, fill_from_seed, read_weights, unwrap, validate, write_weights
from weights_convert.jittor_pickle import MAGIC, dumps_jittor
from weights_helpers import assert_bit_exact, assert_user_error, files_in, run_cli, seeded

# ----------------------------------------------------------------------------------------
# round trips (bit-exact)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["r18vd", "r50vd"])
@pytest.mark.parametrize("fmt,ext", [("safetensors", ".safetensors"), ("npz", ".npz"), ("jittor", ".pkl")])
def test_roundtrip_bit_exact(tmp_path, preset, fmt, ext):
    w = seeded(preset)
    p = tmp_path / f"w{ext}"
    assert write_weights(p, w, fmt) == fmt
    raw, info = read_weights(p)                     # as stored, no spec involved
    if fmt == "safetensors":                        # safetensors stores keys sorted
        raw = OrderedDict((k, raw[k]) for k in w)
    assert_bit_exact(raw, w)
    got, info = read_weights(p, preset)
    assert info["format"] == fmt and info["layout"] == "flat"
    assert info["validation"]["cast"] == [] and info["validation"]["reshaped"] == []
    assert info["validation"]["filled_num_batches_tracked"] == []
    assert_bit_exact(got, w)
    # num_batches_tracked stays int64, 0-d
    nbt = [k for k in w if k.endswith("num_batches_tracked")]
    assert all(got[k].dtype == np.int64 and got[k].shape == () for k in nbt)
    assert files_in(tmp_path) == [p.name]          # no temp file left behind


@pytest.mark.parametrize("preset", ["r18vd", "r50vd"])
def test_cli_chain_bit_exact(tmp_path, capsys, preset):
    """safetensors -> jittor pkl -> npz -> safetensors through the CLI, strict each time."""
    w = seeded(preset)
    write_weights(tmp_path / "a.safetensors", w)
    chain = ["a.safetensors", "b.pkl", "c.npz", "d.safetensors"]
    for src, dst in zip(chain, chain[1:]):
        rc, out, err = run_cli([tmp_path / src, tmp_path / dst, "--config", preset], capsys)
        assert rc == 0, err
        assert f"checked against config '{preset}': ok" in out and "wrote" in out
    got, _ = read_weights(tmp_path / "d.safetensors", preset)
    assert_bit_exact(got, w)


def test_jittor_pkl_layout_on_disk(tmp_path):
    """What we write is what jt.save writes: pickle protocol 4 + sha1 + magic, dict of ndarrays."""
    w = seeded("smoke")
    p = tmp_path / "w.pkl"
    write_weights(p, w)
    blob = p.read_bytes()
    assert blob.endswith(MAGIC)
    body, checksum = blob[:-28], blob[-28:-8]
    assert hashlib.sha1(body).digest() == checksum
    assert body[:2] == b"\x80\x04"
    obj = pickle.loads(body)                       # our own file: plain pickle is fine here
    assert type(obj) is dict and list(obj) == list(w)
    assert all(type(v) is np.ndarray for v in obj.values())


def _fake_jittor_var_pickle(arrays: dict) -> bytes:
    """Bytes exactly as ``jt.save({name: Var})`` lays them out (global ``jittor`` /
    ``jittor_core.Var`` applied to a numpy array), made without Jittor: a stand-in class
    registered under that name only while pickling."""
    class Var:
        def __init__(self, a):
            self.a = a

        def __reduce__(self):
            return (Var, (self.a,))

    Var.__module__, Var.__qualname__ = "jittor", "jittor_core.Var"
    saved = sys.modules.get("jittor")
    fake = types.ModuleType("jittor")
    fake.jittor_core = types.SimpleNamespace(Var=Var)
    sys.modules["jittor"] = fake
    try:
        body = pickle.dumps({k: Var(v) for k, v in arrays.items()}, 4)
    finally:
        if saved is None:
            del sys.modules["jittor"]
        else:
            sys.modules["jittor"] = saved
    assert b"jittor_core.Var" in body
    return body + hashlib.sha1(body).digest() + MAGIC


def test_reads_jittor_var_pickle_without_jittor(tmp_path):
    w = seeded("smoke")
    # a Jittor-saved state_dict: no num_batches_tracked, Vars (int stays out), OrderedDict ok
    jt_like = OrderedDict((k, v) for k, v in w.items() if not k.endswith("num_batches_tracked"))
    p = tmp_path / "model.pkl"
    p.write_bytes(_fake_jittor_var_pickle(jt_like))
    raw, info = read_weights(p)
    assert info["checksum"] == "ok" and info["num_tensors"] == len(jt_like)
    got, info = read_weights(p, "smoke")
    assert info["validation"]["filled_num_batches_tracked"]
    assert_bit_exact(got, w)                       # filled zeros == seeded zeros


def test_pkl_without_trailer_and_bad_checksum(tmp_path):
    w = seeded("smoke")
    body = pickle.dumps(dict(w), 4)
    (tmp_path / "plain.pkl").write_bytes(body)
    got, info = read_weights(tmp_path / "plain.pkl", "smoke")
    assert info["checksum"] == "absent"
    assert_bit_exact(got, w)
    blob = bytearray(dumps_jittor(w))
    blob[100] ^= 0xFF
    (tmp_path / "bad.pkl").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="checksum does not match"):
        read_weights(tmp_path / "bad.pkl")


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

def test_validate_lists_every_problem_in_one_error():
    w = seeded("smoke")
    del w["decoder.enc_output.0.weight"]                       # missing
    w["decoder.extra_head.weight"] = np.zeros((3, 3), np.float32)   # unexpected
    w["encoder.input_proj.0.0.weight"] = np.zeros((64, 64, 3, 3), np.float32)  # wrong shape
    with pytest.raises(WeightsError) as ei:
        validate(w, "smoke")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "1 missing: decoder.enc_output.0.weight" in msg
    assert "1 unexpected: decoder.extra_head.weight" in msg
    assert "1 shape mismatch: encoder.input_proj.0.0.weight (file [64,64,3,3], spec [64,128,1,1])" in msg


def test_validate_truncates_long_lists_with_counts():
    w = seeded("smoke")
    for k in [k for k in w if k.startswith("decoder.dec_bbox_head.")]:
        del w[k]
    with pytest.raises(WeightsError) as ei:
        validate(w, "smoke")
    msg = str(ei.value)
    assert "36 missing: decoder.dec_bbox_head.0.layers.0.weight" in msg and "(+33 more)" in msg


def test_wrong_preset_names_the_matching_one():
    with pytest.raises(WeightsError) as ei:
        validate(seeded("r18vd"), "r50vd")
    msg = str(ei.value)
    assert "do not match config 'r50vd'" in msg and "missing" in msg and "unexpected" in msg
    assert "the file matches preset 'r18vd': is --config right?" in msg
    with pytest.raises(WeightsError) as ei:
        validate(seeded("r50vd"), "r18vd")
    assert "the file matches preset 'r50vd' / 'parity-r50vd'" in str(ei.value)


def test_num_batches_tracked_filled_and_frozen_ones_dropped():
    # r18vd: plain BN everywhere -> drop every num_batches_tracked, they come back as int64 0
    w = seeded("r18vd")
    nbt = [k for k in w if k.endswith("num_batches_tracked")]
    assert nbt
    got, rep = validate(OrderedDict((k, v) for k, v in w.items() if k not in nbt), "r18vd")
    assert rep["filled_num_batches_tracked"] == nbt
    assert_bit_exact(got, w)
    # r50vd: FrozenBN backbone has none; a checkpoint from non-frozen training may carry them
    w = seeded("r50vd")
    extra = OrderedDict()
    for k, v in w.items():
        extra[k] = v
        if k.startswith("backbone.") and k.endswith(".norm.running_var"):
            extra[k.replace("running_var", "num_batches_tracked")] = np.array(1234, np.int64)
    added = [k for k in extra if k not in w]
    assert len(added) > 10
    got, rep = validate(extra, "r50vd")
    assert rep["dropped_num_batches_tracked"] == added
    assert_bit_exact(got, w)
    # ... but a num_batches_tracked where no BN exists at all is an error
    extra["decoder.enc_score_head.num_batches_tracked"] = np.array(0, np.int64)
    with pytest.raises(WeightsError, match="1 unexpected: decoder.enc_score_head.num_batches_tracked"):
        validate(extra, "r50vd")


def test_dtypes_int32_scalars_and_casts():
    w = seeded("smoke")
    src = OrderedDict(w)
    nbt = [k for k in w if k.endswith("num_batches_tracked")]
    for k in nbt:                      # Jittor-style: int32, shape [1]
        src[k] = np.array([7], np.int32)
    src["decoder.enc_output.0.weight"] = w["decoder.enc_output.0.weight"].astype(np.float64)
    got, rep = validate(src, "smoke")
    assert all(got[k].dtype == np.int64 and got[k].shape == () and got[k] == 7 for k in nbt)
    assert len(rep["reshaped"]) == len(nbt)
    assert got["decoder.enc_output.0.weight"].dtype == np.float32
    assert rep["cast_summary"] == {"int32 -> int64": len(nbt), "float64 -> float32": 1}
    got64, rep = validate(w, "smoke", dtype="float64")
    assert all(v.dtype == (np.int64 if k in nbt else np.float64) for k, v in got64.items())
    src["decoder.enc_output.0.bias"] = np.zeros(64, np.int32)        # ints for a float tensor
    src[nbt[0]] = np.zeros((), np.float32)                           # float for an int buffer
    with pytest.raises(WeightsError, match="2 dtype mismatches"):
        validate(src, "smoke")


def _config_with_classes(tmp_path, n):
    p = tmp_path / f"smoke{n}.yaml"
    p.write_text(f"base: smoke\nname: smoke{n}\nnum_classes: {n}\n")
    return str(p)


def test_drop_mismatched_heads(tmp_path, capsys):
    cfg20 = _config_with_classes(tmp_path, 20)
    w = seeded("smoke")                                 # 80 classes
    with pytest.raises(WeightsError) as ei:
        validate(w, cfg20)
    msg = str(ei.value)
    assert "file has 80 classes, config 20" in msg and "--drop-mismatched-heads" in msg
    got, rep = validate(w, cfg20, drop_mismatched_heads=True)
    heads = [e.name for e in param_spec(cfg20)
             if e.name.startswith(("decoder.enc_score_head.", "decoder.dec_score_head.",
                                   "decoder.denoising_class_embed."))]
    assert rep["dropped_heads"] == heads and len(heads) == 2 + 2 * 6 + 1
    assert set(got) == set(w) - set(heads)
    full, filled = fill_from_seed(got, cfg20, seed=5)
    assert filled == heads
    assert [k for k in full] == [e.name for e in param_spec(cfg20)]
    assert full["decoder.enc_score_head.weight"].shape == (20, 64)
    # other mismatches are never dropped
    w["decoder.enc_output.0.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightsError, match="1 shape mismatch: decoder.enc_output.0.weight"):
        validate(w, cfg20, drop_mismatched_heads=True)
    # CLI
    write_weights(tmp_path / "coco.safetensors", seeded("smoke"))
    rc, out, err = run_cli([tmp_path / "coco.safetensors", tmp_path / "t.pkl", "--config", cfg20,
                            "--drop-mismatched-heads"], capsys)
    assert rc == 0, err
    assert "dropped class-dependent heads" in out and "output lacks 15 head tensor(s)" in out
    rc, out, err = run_cli([tmp_path / "coco.safetensors", tmp_path / "t2.pkl", "--config", cfg20,
                            "--drop-mismatched-heads", "--fill-seed", "5"], capsys)
    assert rc == 0, err
    got, _ = read_weights(tmp_path / "t2.pkl", cfg20)
    assert_bit_exact(got, full)


# ----------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------

def test_unwrap_layouts():
    sd = seeded("smoke")
    ddp = OrderedDict(("module." + k, v) for k, v in sd.items())
    cases = [
        ({"ema": {"module": sd, "updates": 10}, "model": {"x": np.zeros(1)}, "last_epoch": 3},
         "ema.module", None, ["model", "last_epoch", "ema.updates"]),
        ({"model": ddp, "optimizer": {"state": {}}}, "model", "module.", ["optimizer"]),
        ({"state_dict": sd}, "state_dict", None, []),
        (ddp, "flat", "module.", []),
        (sd, "flat", None, []),
    ]
    for obj, layout, prefix, unused in cases:
        got, info = unwrap(obj)
        assert info["layout"] == layout and info["prefix_stripped"] == prefix and info["unused_keys"] == unused
        assert list(got) == list(sd)
    with pytest.raises(WeightsError, match="no state_dict found"):
        unwrap({"epoch": 3, "config": {"lr": 1}})
    with pytest.raises(WeightsError, match="1 non-tensor entry: b"):
        unwrap({"a": np.zeros(2), "b": "text"})


def test_official_layout_in_pkl(tmp_path):
    sd = seeded("smoke")
    ckpt = {"ema": {"module": OrderedDict(("module." + k, v) for k, v in sd.items()), "updates": 7},
            "last_epoch": 71}
    p = tmp_path / "official.pkl"
    p.write_bytes(pickle.dumps(ckpt, 4))
    got, info = read_weights(p, "smoke")
    assert (info["layout"], info["prefix_stripped"]) == ("ema.module", "module.")
    assert_bit_exact(got, sd)


# ----------------------------------------------------------------------------------------
# atomic output
# ----------------------------------------------------------------------------------------

def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    w = seeded("smoke")
    import weights_convert.formats as F

    def exploding_savez(f, **arrays):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(F.np, "savez", exploding_savez)
    with pytest.raises(KeyboardInterrupt):
        write_weights(tmp_path / "out.npz", w)
    assert files_in(tmp_path) == []
    (tmp_path / "out.npz").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        write_weights(tmp_path / "out.npz", w)
    assert files_in(tmp_path) == ["out.npz"] and (tmp_path / "out.npz").read_bytes() == b"old"


def test_output_permissions_follow_umask(tmp_path):
    write_weights(tmp_path / "w.npz", {"a": np.zeros(1, np.float32)})
    old = os.umask(0)
    os.umask(old)
    assert (os.stat(tmp_path / "w.npz").st_mode & 0o777) == (0o666 & ~old)


# ----------------------------------------------------------------------------------------
# torch files where torch is absent (simulated in the torch env)
# ----------------------------------------------------------------------------------------

def test_pth_without_torch_names_the_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)        # import torch -> ImportError
    (tmp_path / "x.pth").write_bytes(b"PK\x03\x04whatever")
    with pytest.raises(WeightsError, match="needs PyTorch.*PyTorch environment"):
        read_weights(tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="needs PyTorch"):
        write_weights(tmp_path / "y.pth", {"a": np.zeros(1, np.float32)})
    write_weights(tmp_path / "a.npz", {"a": np.zeros(1, np.float32)})
    rc, out, err = run_cli([tmp_path / "a.npz", tmp_path / "y.pth"], capsys)
    assert_user_error(rc, err, "needs PyTorch", ".venvs/torch")
    rc, out, err = run_cli([tmp_path / "x.pth", tmp_path / "y.pkl"], capsys)
    assert_user_error(rc, err, "needs PyTorch", ".venvs/torch")
    assert files_in(tmp_path) == ["a.npz", "x.pth"]
