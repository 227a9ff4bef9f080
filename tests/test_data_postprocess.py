"""Post-processing (official RTDETRPostProcessor, numpy) and COCO result dicts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rtdetr_core import load_config
from rtdetr_core.postprocess import PostProcessor, postprocess, to_coco_results


def example():
    # B=1, Q=2, C=3.  sigmoid: q0 = [.5, .8808, .2689], q1 = [.7311, .0474, .9526]
    logits = np.array([[[0.0, 2.0, -1.0], [1.0, -3.0, 3.0]]], np.float32)
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]], np.float32)   # cxcywh
    sizes = np.array([[100, 200]])                                                      # (h, w)
    return logits, boxes, sizes


def test_hand_computed_example():
    logits, boxes, sizes = example()
    (r,) = postprocess(logits, boxes, sizes, num_top_queries=3)
    # flattened scores q*C + c: best 5 (q1,c2), then 1 (q0,c1), then 3 (q1,c0)
    s = 1 / (1 + np.exp(-np.array([3.0, 2.0, 1.0])))
    np.testing.assert_allclose(r["scores"], s, rtol=1e-6)
    assert r["labels"].tolist() == [2, 1, 0] and r["labels"].dtype == np.int64
    # q0: x 0.4..0.6 of w=200, y 0.3..0.7 of h=100; q1: x 0..0.5, y 0.5..1.0
    np.testing.assert_allclose(r["boxes"], [[0, 50, 100, 100], [80, 30, 120, 70], [0, 50, 100, 100]], atol=1e-4)
    assert r["scores"].dtype == np.float32 and r["boxes"].dtype == np.float32
    # label -> category id mapping
    (m,) = postprocess(logits, boxes, sizes, num_top_queries=3, label_to_category=[1, 3, 7])
    assert m["labels"].tolist() == [7, 3, 1]
    # k larger than Q*C is clamped; all 6 entries, descending
    (a,) = postprocess(logits, boxes, sizes, num_top_queries=300)
    assert len(a["scores"]) == 6 and np.all(np.diff(a["scores"]) <= 0)
    assert a["labels"].tolist() == [2, 1, 0, 0, 2, 1]


def test_ties_are_ordered_by_index_and_float64_kept():
    logits = np.zeros((2, 3, 2))
    boxes = np.full((2, 3, 4), 0.5)
    out = postprocess(logits, boxes, np.array([[10, 10], [20, 40]]), num_top_queries=4)
    assert out[0]["labels"].tolist() == [0, 1, 0, 1]
    assert out[0]["scores"].dtype == np.float64
    np.testing.assert_allclose(out[1]["boxes"][0], [10, 5, 30, 15])


def test_softmax_variant():
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0]]])   # last column: no object
    boxes = np.tile(np.array([0.5, 0.5, 1.0, 1.0]), (1, 3, 1))
    (r,) = postprocess(logits, boxes, np.array([[4, 4]]), num_top_queries=2, use_focal_loss=False)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    assert r["labels"].tolist() == [1, 0]
    np.testing.assert_allclose(r["scores"], [p[1, 1], p[0, 0]])


def test_postprocessor_from_config_and_bad_shapes():
    cfg = load_config("smoke")
    pp = PostProcessor.from_config(cfg, label_to_category=[1, 3, 7])
    logits, boxes, sizes = example()
    (r,) = pp({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(r["scores"]) == 6 and r["labels"][0] == 7
    with pytest.raises(ValueError, match="orig_sizes"):
        postprocess(logits, boxes, np.array([100, 200]))
    with pytest.raises(ValueError, match="pred_boxes"):
        postprocess(logits, boxes[..., :3], sizes)


def test_to_coco_results():
    logits, boxes, sizes = example()
    res = postprocess(logits, boxes, sizes, num_top_queries=3)
    out = to_coco_results(res, [42], label_to_category=[1, 3, 7])
    assert [d["category_id"] for d in out] == [7, 3, 1]
    assert out[1] == {"image_id": 42, "category_id": 3, "bbox": pytest.approx([80, 30, 40, 40], abs=1e-4),
                      "score": pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-6)}
    assert all(type(d["image_id"]) is int and type(d["score"]) is float and
               all(type(v) is float for v in d["bbox"]) for d in out)
    json.dumps(out)
    assert len(to_coco_results(res, [42], score_threshold=0.8)) == 2
    with pytest.raises(ValueError):
        to_coco_results(res, [1, 2])
