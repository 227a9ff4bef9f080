"""Config presets: official values, strict YAML validation with one-line errors."""
import os
import textwrap

import pytest

from rtdetr_core.config import ConfigError, available_presets, config_from_dict, load_config


def test_presets_present():
    for name in ("r18vd", "r34vd", "r50vd", "r101vd", "parity-r50vd", "smoke"):
        assert name in available_presets()


def test_official_values():
    r18, r50 = load_config("r18vd"), load_config("r50vd")
    assert (r18.decoder.num_decoder_layers, r18.encoder.expansion, r18.backbone.freeze_at,
            r18.backbone.freeze_norm) == (3, 0.5, -1, False)
    assert (r50.decoder.num_decoder_layers, r50.encoder.expansion, r50.backbone.freeze_at,
            r50.backbone.freeze_norm) == (6, 1.0, 0, True)
    for c in (r18, r50):
        assert c.decoder.num_queries == 300 and c.num_classes == 80
        assert c.decoder.num_denoising == 100 and c.decoder.label_noise_ratio == 0.5
        assert c.criterion.weight_dict == {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        assert (c.criterion.matcher.cost_class, c.criterion.matcher.cost_bbox, c.criterion.matcher.cost_giou) == (2, 5, 2)
        assert c.optimizer.clip_max_norm == 0.1
    assert load_config("r34vd").decoder.num_decoder_layers == 4
    assert load_config("r101vd").encoder.hidden_dim == 384


def test_harness_presets():
    p = load_config("parity-r50vd")
    assert (p.decoder.num_queries, p.decoder.num_decoder_layers, p.train.image_size, p.num_classes) == (300, 6, [576, 640], 80)
    assert p.backbone.depth == 50 and p.optimizer.lr == 5e-5 and p.train.batch_size == 1
    s = load_config("smoke")
    assert s.decoder.num_queries == 300 and s.decoder.num_decoder_layers == 6 and s.decoder.num_denoising > 0
    assert s.eval_idx == 5


def test_unknown_key_names_it(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(textwrap.dedent("""
        base: r18vd
        decoder:
          num_querys: 100
    """))
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    msg = str(e.value)
    assert "decoder.num_querys" in msg and "bad.yaml" in msg and "\n" not in msg


@pytest.mark.parametrize("body,key", [
    ("backbone:\n  depth: 42\n", "backbone.depth"),
    ("decoder:\n  num_queries: many\n", "decoder.num_queries"),
    ("train:\n  image_size: [640, 600]\n", "train.image_size[1]"),
    ("encoder:\n  hidden_dim: 250\n", "encoder"),
    ("num_classes: 0\n", "num_classes"),
])
def test_bad_values_name_the_key(tmp_path, body, key):
    f = tmp_path / "c.yaml"
    f.write_text("base: r50vd\n" + body)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'r77'"):
        load_config("r77")
    f = tmp_path / "broken.yaml"
    f.write_text("decoder: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(f))


def test_roundtrip_dict_and_digest():
    c = load_config("smoke")
    c2 = config_from_dict(c.to_dict())
    assert c2 == c and c2.digest() == c.digest()
    assert load_config("r18vd").digest() != c.digest()
