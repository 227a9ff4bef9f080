"""weights_convert against real Jittor (Jittor env): files Jittor writes are read by the
restricted reader, files we write are read by ``jt.load`` and ``Module.load``."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest

from conftest import HAS_JITTOR
from rtdetr_core.param_spec import param_spec
from test_weights_convert_cli import _Evil
from weights_convert import WeightsError, read_weights, write_weights
from weights_helpers import assert_bit_exact, seeded

pytestmark = pytest.mark.jittor
# This file's name (test_weights_*) gets it collected in both environments; its tests are
# for the jittor env only (deselected elsewhere by -m "not jittor").  Collect nothing where
# jittor is absent, so conftest's framework check sees no jittor-marked item there.
__test__ = HAS_JITTOR


@pytest.fixture(scope="module")
def jt():
    os.environ["nvcc_path"] = ""
    import jittor
    return jittor


def _spec_module(jt, preset):
    """A Jittor module with the spec's attribute tree (no num_batches_tracked, as Jittor's BN)."""
    class Node(jt.nn.Module):
        pass

    root = Node()
    for e in param_spec(preset):
        if e.name.endswith("num_batches_tracked"):
            continue
        *parents, leaf = e.name.split(".")
        m = root
        for p in parents:
            if p not in m.__dict__:
                setattr(m, p, Node())
            m = getattr(m, p)
        setattr(m, leaf, jt.zeros(e.shape, "float32"))
    return root


def test_reads_module_save_and_jt_save(tmp_path, jt):
    rng = np.random.default_rng(0)

    class Net(jt.nn.Module):          # Vars from numpy: no random-init kernels to compile
        def __init__(self):
            self.conv = jt.nn.Module()
            self.conv.weight = jt.array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
            self.bn = jt.nn.Module()
            self.bn.running_var = jt.array(rng.uniform(0.5, 1.5, 4).astype(np.float32))
            self.fc = jt.nn.Module()
            self.fc.bias = jt.array(rng.normal(size=2).astype(np.float64))   # Jittor: float32

    net = Net()
    net.save(str(tmp_path / "net.pkl"))
    want = OrderedDict((k, v.numpy()) for k, v in net.state_dict().items())
    assert list(want) == ["conv.weight", "bn.running_var", "fc.bias"]
    got, info = read_weights(tmp_path / "net.pkl")
    assert info["checksum"] == "ok" and info["format"] == "jittor"
    assert_bit_exact(got, want)
    # jt.save of a mixed, nested checkpoint: Vars and numpy arrays under 'model'
    mixed = {"model": {"a": jt.array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                       "b": np.arange(3, dtype=np.int64)}, "epoch": 3}
    jt.save(mixed, str(tmp_path / "mixed.pkl"))
    got, info = read_weights(tmp_path / "mixed.pkl")
    assert info["layout"] == "model" and info["unused_keys"] == ["epoch"]
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int64
    assert got["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("preset", ["smoke", "r18vd"])
def test_jt_load_and_module_load_accept_our_pkl(tmp_path, capsys, jt, preset):
    w = seeded(preset)
    write_weights(tmp_path / "w.pkl", w)
    loaded = jt.load(str(tmp_path / "w.pkl"))
    assert type(loaded) is dict
    assert_bit_exact(OrderedDict(loaded), w)          # int64 num_batches_tracked intact
    m = _spec_module(jt, preset)
    m.load(str(tmp_path / "w.pkl"))
    out = capsys.readouterr()
    assert "failed" not in out.out + out.err
    sd = m.state_dict()
    assert len(sd) == sum(not k.endswith("num_batches_tracked") for k in w)
    for k, v in sd.items():
        assert v.numpy().tobytes() == w[k].tobytes(), k
    # and back: Module.save -> our reader -> strict validation, bit-exact
    m.save(str(tmp_path / "saved.pkl"))
    got, info = read_weights(tmp_path / "saved.pkl", preset)
    assert_bit_exact(got, w)


def test_jt_load_would_run_the_payload_we_refuse_it(tmp_path, jt):
    """Why the restricted reader exists: jt.load executes pickles.  Ours refuses."""
    marker = tmp_path / "PWNED"
    body = pickle.dumps({"w": _Evil(f"touch {marker}")}, 4)
    (tmp_path / "evil.pkl").write_bytes(body)
    with pytest.raises(WeightsError, match="refused to unpickle global"):
        read_weights(tmp_path / "evil.pkl")
    assert not marker.exists()
