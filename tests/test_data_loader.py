"""Seeded streams, epoch order and batching — identical across the two interpreters."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from rtdetr_core import load_config
from rtdetr_core.data import BatchLoader, collate, iterate_batches, loader_from_config
from rtdetr_core.rng import STREAM_NAMES, Streams, draw_multi_scale, epoch_order, stream, streams

from test_data_synthetic import REPO, other_env_python


class FakeDataset:
    """n items; item i has i % 3 boxes, a 3x8x8 image filled with i/100."""

    def __init__(self, n, num_classes=5):
        self.n, self.num_classes = n, num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k = i % 3
        img = np.full((3, 8, 8), i / 100, np.float32)
        return img, {"labels": np.arange(k, dtype=np.int64) % self.num_classes,
                     "boxes": np.full((k, 4), 0.25, np.float32), "image_id": 1000 + i,
                     "orig_size": np.array([100 + i, 200], np.int64)}


# The same computation, run here and in the other interpreter.
SCRIPT = r"""
import json, sys
import numpy as np
from rtdetr_core.rng import Streams, epoch_order, draw_multi_scale
from rtdetr_core.data.loader import iterate_batches
from rtdetr_core.denoising import draw_denoising

class DS:
    num_classes = 5
    def __len__(self): return 11
    def __getitem__(self, i):
        k = i % 3
        return (np.full((3, 8, 8), i / 100, np.float32),
                {"labels": np.arange(k, dtype=np.int64), "boxes": np.full((k, 4), 0.25, np.float32),
                 "image_id": 1000 + i, "orig_size": np.array([100 + i, 200], np.int64)})

def run():
    out = {"orders": [epoch_order(n, s, e).tolist() for n in (1, 7, 118287 // 1000) for s in (0, 7, 2**31 + 5)
                      for e in (0, 1, 71)]}
    st = Streams(123)
    out["scale"] = [draw_multi_scale(st.scale, [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800])
                    for _ in range(50)]
    dn = draw_denoising(st.denoise, [3, 0, 5], 100, 80)
    out["dn"] = {k: np.asarray(v).tolist() for k, v in dn.items()}
    out["order_stream"] = st.order.permutation(20).tolist()
    st = Streams(9)
    batches = []
    for epoch in (0, 1):
        for images, targets, meta in iterate_batches(DS(), 4, seed=9, epoch=epoch, multi_scale=[320, 352, 384],
                                                     streams=st, num_denoising=10):
            batches.append({"indices": meta["indices"].tolist(), "ids": meta["image_ids"].tolist(),
                            "size": meta["multi_scale_size"], "img": float(images.sum()),
                            "dn": None if meta["dn_draws"] is None else
                                  {k: np.asarray(v).tolist() for k, v in meta["dn_draws"].items()}})
    out["batches"] = batches
    return out

if __name__ == "__main__":
    print(json.dumps(run(), sort_keys=True))
"""


def _run_here():
    ns = {"__name__": "not_main"}
    exec(compile(SCRIPT, "<script>", "exec"), ns)
    return json.loads(json.dumps(ns["run"](), sort_keys=True))


def test_same_draws_in_the_other_interpreter(tmp_path):
    mine = _run_here()
    script = tmp_path / "draws.py"
    script.write_text(SCRIPT)
    for py in other_env_python():
        r = subprocess.run([py, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=REPO))
        assert r.returncode == 0, f"{py} failed:\n{r.stderr[-3000:]}"
        theirs = json.loads(r.stdout)
        for key in mine:
            assert mine[key] == theirs[key], f"'{key}' differs between this interpreter and {py}"


def test_epoch_order():
    a = epoch_order(50, seed=0, epoch=0)
    assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, np.random.default_rng([0, 0]).permutation(50))
    assert np.array_equal(a, epoch_order(50, 0, 0))
    assert not np.array_equal(a, epoch_order(50, 0, 1))
    assert not np.array_equal(a, epoch_order(50, 1, 0))
    assert epoch_order(5, 0, 3, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert epoch_order(0, 0, 0).tolist() == []
    with pytest.raises(ValueError):
        epoch_order(5, -1, 0)


def test_streams_named_and_independent():
    s = streams(5)
    assert STREAM_NAMES == ("order", "denoise", "scale")
    draws = {n: s[n].random(4).tolist() for n in STREAM_NAMES}
    assert len({tuple(v) for v in draws.values()}) == 3
    # each stream is SeedSequence(seed).spawn(3)[k], regardless of which is used first
    kids = np.random.SeedSequence(5).spawn(3)
    for k, n in enumerate(STREAM_NAMES):
        assert np.random.default_rng(kids[k]).random(4).tolist() == draws[n]
        assert stream(5, n).random(4).tolist() == draws[n]
    # drawing from one stream leaves the others unchanged
    s1, s2 = streams(5), streams(5)
    s1.scale.random(100)
    assert s1.denoise.random(3).tolist() == s2.denoise.random(3).tolist()
    # per-epoch streams and state round trip
    e1 = s2.for_epoch(1)
    assert e1.scale.random() != streams(5).scale.random()
    st = Streams(8)
    st.order.random(3)
    saved = st.state()
    x = st.scale.random(2).tolist()
    st.set_state(saved)
    assert st.scale.random(2).tolist() == x
    with pytest.raises(ValueError):
        stream(0, "nope")


def test_draw_multi_scale():
    rng = np.random.default_rng(0)
    sizes = [480, 512, 544]
    d = [draw_multi_scale(rng, sizes) for _ in range(200)]
    assert set(d) == set(sizes) and all(isinstance(v, int) for v in d)
    rng2 = np.random.default_rng(0)
    assert draw_multi_scale(rng2, None) is None and draw_multi_scale(rng2, []) is None
    assert draw_multi_scale(rng2, sizes) == d[0], "no draw may be consumed without multi-scale"


def test_batches_stack_and_cover_the_epoch():
    ds = FakeDataset(10)
    seen = []
    batches = list(iterate_batches(ds, 4, seed=1, epoch=2))
    assert [b[0].shape for b in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    for images, targets, meta in batches:
        assert images.dtype == np.float32 and len(targets) == images.shape[0]
        assert meta["epoch"] == 2 and meta["multi_scale_size"] is None and meta["dn_draws"] is None
        assert meta["image_ids"].tolist() == [1000 + i for i in meta["indices"].tolist()]
        assert meta["orig_sizes"].shape == (len(targets), 2) and meta["orig_sizes"].dtype == np.int64
        for i, img, t in zip(meta["indices"], images, targets):
            assert np.allclose(img, i / 100) and len(t["labels"]) == i % 3
        seen += meta["indices"].tolist()
    assert seen == epoch_order(10, 1, 2).tolist()
    assert len(list(iterate_batches(ds, 4, seed=1, drop_last=True))) == 2
    assert [m["indices"].tolist() for _, _, m in iterate_batches(ds, 4, shuffle=False)][0] == [0, 1, 2, 3]
    assert list(iterate_batches(ds, 4, dtype=np.float64))[0][0].dtype == np.float64


def test_multi_scale_and_dn_draws_from_the_streams():
    ds = FakeDataset(9)
    sizes = [480, 512, 544, 576]
    st = Streams(4)
    got = [(m["multi_scale_size"], m["dn_draws"]) for _, _, m in
           iterate_batches(ds, 3, seed=4, multi_scale=sizes, streams=st, num_denoising=20)]
    ref = Streams(4)
    from rtdetr_core.denoising import draw_denoising
    for (size, dn), (_, targets, _m) in zip(got, iterate_batches(ds, 3, seed=4)):
        assert size == draw_multi_scale(ref.scale, sizes)
        want = draw_denoising(ref.denoise, [len(t["labels"]) for t in targets], 20, ds.num_classes)
        assert (dn is None) == (want is None)
        if dn is not None:
            for k in want:
                assert np.array_equal(dn[k], want[k])


def test_batch_loader_continues_streams_across_epochs():
    ds = FakeDataset(6)
    ld = BatchLoader(ds, 2, seed=3, multi_scale=[1, 2, 3, 4, 5, 6, 7, 8])
    assert len(ld) == 3
    e0 = [m["multi_scale_size"] for _, _, m in ld]
    ld.set_epoch(1)
    e1 = [(m["multi_scale_size"], m["indices"].tolist()) for _, _, m in ld]
    ref = Streams(3)
    allsizes = [draw_multi_scale(ref.scale, list(range(1, 9))) for _ in range(6)]
    assert e0 + [s for s, _ in e1] == allsizes
    assert sum((i for _, i in e1), []) == epoch_order(6, 3, 1).tolist()


def test_loader_from_config():
    cfg = load_config("smoke")
    cfg.train.multi_scale = [96, 128, 160]
    ds = FakeDataset(5, num_classes=cfg.num_classes)
    tr = loader_from_config(cfg, ds, seed=2)
    images, targets, meta = next(iter(tr))
    assert images.shape[0] == cfg.train.batch_size and meta["multi_scale_size"] in (96, 128, 160)
    ev = loader_from_config(cfg, ds, train=False)
    metas = [m for _, _, m in ev]
    assert metas[0]["indices"].tolist() == [0, 1] and all(m["multi_scale_size"] is None and
                                                          m["dn_draws"] is None for m in metas)


def test_collate_rejects_mixed_sizes():
    a = (np.zeros((3, 8, 8), np.float32), {})
    b = (np.zeros((3, 8, 16), np.float32), {})
    with pytest.raises(ValueError, match="fixed image_size"):
        collate([a, b])
