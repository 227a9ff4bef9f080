"""The parameter spec equals the official RT-DETR state_dict contract, key for key."""
import json
import os
import subprocess
import sys

import pytest

from rtdetr_core.init import seeded_weights
from rtdetr_core.param_spec import param_spec, spec_totals

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("preset", ["r18vd", "r50vd"])
def test_equals_official_keys(preset):
    ref = json.load(open(os.path.join(DATA, f"official_keys_{preset}.json")))["keys"]
    ours = param_spec(preset)
    assert [(r["key"], tuple(r["shape"]), r["dtype"], r["kind"]) for r in ref] == \
           [(e.name, e.shape, e.dtype, e.kind) for e in ours]


def test_official_totals():
    summary = json.load(open(os.path.join(DATA, "official_model_summary.json")))
    for preset in ("r18vd", "r50vd"):
        t = spec_totals(param_spec(preset))
        s = summary[preset]
        for k in ("num_state_dict_keys", "params_total", "params_trainable", "params_frozen",
                  "params_backbone", "params_encoder", "params_decoder"):
            assert t[k] == s[k], (preset, k)
    assert spec_totals(param_spec("r18vd"))["params_total"] == 20_184_464
    t50 = spec_totals(param_spec("r50vd"))
    assert (t50["params_total"], t50["params_trainable"]) == (42_891_372, 42_862_860)


def test_other_variants_match_official_summary():
    summ = json.load(open(os.path.join(DATA, "official_variants_summary.json")))
    for preset in ("r34vd", "r101vd"):
        t = spec_totals(param_spec(preset))
        assert t["num_state_dict_keys"] == summ[preset]["num_sd_keys"]
        assert t["params_total"] == summ[preset]["params_total"]
        assert t["params_backbone"] == summ[preset]["backbone"]


def test_frozen_flags_r50vd():
    frozen = [e.name for e in param_spec("r50vd") if e.kind == "param" and not e.trainable]
    assert frozen == [f"backbone.conv1.conv1_{i}.conv.weight" for i in (1, 2, 3)]


def test_cli_spec_json_equals_official():
    out = subprocess.run([sys.executable, "-m", "parity", "spec", "--config", "r50vd", "--json"],
                         capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    ref = json.load(open(os.path.join(DATA, "official_keys_r50vd.json")))["keys"]
    assert [(k["key"], k["shape"], k["dtype"], k["kind"]) for k in got["keys"]] == \
           [(r["key"], r["shape"], r["dtype"], r["kind"]) for r in ref]
    assert got["totals"]["params_total"] == 42_891_372


def test_seeded_weights_deterministic_and_ruled():
    a, b = seeded_weights("r18vd", 3), seeded_weights("r18vd", 3)
    assert list(a) == [e.name for e in param_spec("r18vd")]
    assert all((a[k] == b[k]).all() for k in a)
    assert (a["decoder.enc_output.0.bias"] == 0).all()
    assert a["backbone.conv1.conv1_1.norm.num_batches_tracked"].dtype.name == "int64"
    assert abs(a["decoder.enc_score_head.bias"].mean() + 4.595) < 0.01
    assert (a["decoder.denoising_class_embed.weight"][80] != 0).any()   # padding row is drawn
    c = seeded_weights("r18vd", 4)
    assert not (c["backbone.conv1.conv1_1.conv.weight"] == a["backbone.conv1.conv1_1.conv.weight"]).all()
