"""COCO evaluation of the 12 standard metrics, on the bundled synthetic val set."""
from __future__ import annotations

import numpy as np
import pytest

from rtdetr_core.coco_eval import METRIC_NAMES, evaluate, format_metrics
from rtdetr_core.data import DataError, ensure_synthetic_dataset, open_split
from rtdetr_core.postprocess import postprocess, to_coco_results


@pytest.fixture(scope="module")
def val():
    return open_split(ensure_synthetic_dataset(), "val", image_size=(64, 64))


def perfect(ds, shift=0.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]],
             "score": 0.9} for a in ds.coco.dataset["annotations"]]


def test_perfect_detections_score_one(val, capsys):
    m = evaluate(val.coco, perfect(val))
    assert list(m) == list(METRIC_NAMES)
    for k in METRIC_NAMES:
        if k == "AR1":   # images with several objects cannot reach recall 1 with one detection
            assert 0 < m[k] < 1
        else:
            assert m[k] == pytest.approx(1.0), (k, m[k])
    assert capsys.readouterr().out == "", "pycocotools printed although verbose=False"
    assert "AP 1.000" in format_metrics(m)


def test_shifted_detection_lowers_ap(val):
    base = evaluate(val.coco, perfect(val))["AP"]
    shifted = perfect(val)
    shifted[0]["bbox"][0] += 0.3 * shifted[0]["bbox"][2]           # one box off by 30 % of its width
    one = evaluate(val.coco, shifted)
    assert one["AP"] < base and one["AP50"] == pytest.approx(1.0)    # IoU 0.54: still a match at .5
    worse = evaluate(val.coco, perfect(val, shift=0.3))
    assert worse["AP"] < one["AP"] and worse["AP75"] < 0.5


def test_through_postprocess_and_path_input(val):
    """Outputs made from the ground truth of each image, through postprocess + to_coco_results."""
    results = []
    for i in range(len(val)):
        _, t = val[i]
        q, c = 10, val.num_classes
        logits = np.full((1, q, c), -10.0, np.float32)
        boxes = np.full((1, q, 4), 0.5, np.float32)
        n = min(len(t["labels"]), q)
        logits[0, np.arange(n), t["labels"][:n]] = 10.0
        boxes[0, :n] = t["boxes"][:n]
        res = postprocess(logits, boxes, t["orig_size"][None], num_top_queries=q,
                          label_to_category=val.label_to_category)
        results += to_coco_results(res, [t["image_id"]])
    m = evaluate(val.ann_file, results)        # annotation path accepted too
    assert m["AP50"] > 0.5 and m["AP"] > 0.4   # images with > 10 objects cannot be complete
    m2 = evaluate(val, results, img_ids=[im for im in val.ids if len(val.coco.imgToAnns[im]) <= 10])
    assert m2["AP"] > 0.9


def test_empty_results(val):
    m = evaluate(val.coco, [])
    assert m["AP"] == 0.0 and m["AR100"] == 0.0 and list(m) == list(METRIC_NAMES)


def test_verbose_prints_and_per_category(val, capsys):
    m = evaluate(val.coco, perfect(val), verbose=True, per_category=True)
    assert "Average Precision" in capsys.readouterr().out
    assert set(m["per_category"]) == {"rectangle", "ellipse", "triangle", "cross", "ring", "star"}
    assert all(v == pytest.approx(1.0) for v in m["per_category"].values())


def test_bad_results_and_gt(val, tmp_path):
    with pytest.raises(DataError, match="image_id 123456789 is not in the ground truth"):
        evaluate(val.coco, [{"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DataError, match="labels not mapped"):
        evaluate(val.coco, [{"image_id": val.ids[0], "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DataError, match="missing key 'score'"):
        evaluate(val.coco, [{"image_id": val.ids[0], "category_id": 1, "bbox": [0, 0, 1, 1]}])
    bad = tmp_path / "gt.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError) as e:
        evaluate(str(bad), [])
    assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="annotation file not found"):
        evaluate(str(tmp_path / "missing.json"), [])
