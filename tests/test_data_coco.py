"""COCO reader: category remap, validation transform, targets, EXIF/modes, one-line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from rtdetr_core.data import (COCO_CATEGORY_IDS, CategoryMap, CocoDetection, DataError, find_split,
                              load_coco_json, open_split)
from rtdetr_core.data.image import read_image, val_transform


def write_coco(root, split="val2017", images=(), annotations=(), categories=None):
    """A tiny dataset in the real COCO layout; ``images``: list of (id, file_name, PIL image)."""
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    imgs = []
    for img_id, name, im in images:
        if im is not None:
            im.save(os.path.join(img_dir, name))
            w, h = im.size
        else:
            w, h = 10, 10
        imgs.append({"id": img_id, "file_name": name, "width": w, "height": h})
    cats = categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]
    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(ann_file, "w") as fh:
        json.dump({"images": imgs, "annotations": list(annotations), "categories": cats}, fh)
    return img_dir, ann_file


def ann(i, img, cat, bbox, **kw):
    return dict(id=i, image_id=img, category_id=cat, bbox=list(bbox), area=bbox[2] * bbox[3], iscrowd=0, **kw)


def rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, f"error message spans several lines: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------
# categories
# ---------------------------------------------------------------------------------------

def test_category_map_non_contiguous_round_trip():
    m = CategoryMap([25, 3, 1, 12, 7, 18], {1: "rectangle", 25: "star"})
    assert m.num_classes == 6
    assert m.label_to_category.tolist() == [1, 3, 7, 12, 18, 25]
    assert m.names[0] == "rectangle" and m.names[-1] == "star" and m.names[1] == "3"
    ids = np.array([[25, 1], [12, 7]])
    labels = m.to_labels(ids)
    assert labels.dtype == np.int64 and labels.tolist() == [[5, 0], [3, 2]]
    assert np.array_equal(m.to_categories(labels), ids)
    assert np.array_equal(m.to_labels(m.to_categories(np.arange(6))), np.arange(6))
    with pytest.raises(DataError, match=r"unknown category id\(s\) \[2\]"):
        m.to_labels([1, 2])
    with pytest.raises(DataError, match="out of range"):
        m.to_categories([6])
    with pytest.raises(DataError, match="duplicate"):
        CategoryMap([1, 1])


def test_category_map_coco_91_id_space():
    m = CategoryMap.coco80()
    assert m.num_classes == 80 and len(COCO_CATEGORY_IDS) == 80
    assert m.label_to_category[0] == 1 and m.label_to_category[-1] == 90
    unused = sorted(set(range(1, 92)) - set(COCO_CATEGORY_IDS))
    assert unused == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
    # the official mscoco_category2label: label = position of the id among the sorted ids
    assert m.to_labels([1, 11, 13, 25, 27, 90]).tolist() == [0, 10, 11, 23, 24, 79]
    assert m.names[m.category_to_label[90]] == "toothbrush" and m.names[0] == "person"
    every = np.arange(80)
    assert np.array_equal(m.to_labels(m.to_categories(every)), every)
    for bad in unused:
        with pytest.raises(DataError):
            m.to_labels([bad])


def test_dataset_uses_sorted_file_categories_and_explicit_coco_map(tmp_path):
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 13, "name": "stop sign"}, {"id": 1, "name": "person"}]
    write_coco(str(tmp_path), images=[(7, "a.png", rgb(40, 30))],
               annotations=[ann(1, 7, 90, (0, 0, 10, 10)), ann(2, 7, 13, (5, 5, 10, 10)), ann(3, 7, 1, (1, 1, 5, 5))],
               categories=cats)
    ds = open_split(str(tmp_path), "val", image_size=(32, 32))
    assert ds.label_to_category.tolist() == [1, 13, 90] and ds.num_classes == 3
    assert ds[0][1]["labels"].tolist() == [2, 1, 0]
    coco = open_split(str(tmp_path), "val", image_size=(32, 32), category_map=CategoryMap.coco80())
    assert coco.num_classes == 80 and coco[0][1]["labels"].tolist() == [79, 11, 0]
    with pytest.raises(DataError, match=r"category id\(s\) \[90\] not in the given category map"):
        open_split(str(tmp_path), "val", category_map=CategoryMap([1, 13]))


# ---------------------------------------------------------------------------------------
# transform and targets
# ---------------------------------------------------------------------------------------

def test_transform_shape_dtype_range_and_boxes(tmp_path):
    im = rgb(200, 100)   # w=200, h=100
    write_coco(str(tmp_path), images=[(1, "x.png", im), (2, "empty.png", rgb(50, 60, 1))],
               annotations=[ann(1, 1, 5, (20, 10, 40, 30)), ann(2, 1, 1, (0, 0, 200, 100))])
    ds = open_split(str(tmp_path), "val", image_size=(64, 96))
    assert len(ds) == 2
    img, t = ds[0]
    assert img.shape == (3, 64, 96) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    # exactly PIL's bilinear resize (aspect not kept) divided by 255 in float32
    ref = np.asarray(im.resize((96, 64), Image.BILINEAR)).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert np.array_equal(img, ref)
    assert t["image_id"] == 1 and t["orig_size"].tolist() == [100, 200] and t["size"].tolist() == [64, 96]
    assert t["labels"].dtype == np.int64 and t["labels"].tolist() == [1, 0]
    assert t["boxes"].dtype == np.float32 and t["boxes"].shape == (2, 4)
    # normalised cxcywh relative to the ORIGINAL size (200 x 100), not the model size
    np.testing.assert_allclose(t["boxes"][0], [(20 + 20) / 200, (10 + 15) / 100, 40 / 200, 30 / 100], rtol=1e-6)
    np.testing.assert_allclose(t["boxes"][1], [0.5, 0.5, 1.0, 1.0])
    # image without boxes: kept, with empty well-typed targets
    img2, t2 = ds[1]
    assert img2.shape == (3, 64, 96)
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,) and t2["labels"].dtype == np.int64
    # float64 mode and native size
    ds64 = open_split(str(tmp_path), "val", image_size=None, dtype=np.float64)
    img64, t64 = ds64[0]
    assert img64.shape == (3, 100, 200) and img64.dtype == np.float64 and t64["boxes"].dtype == np.float64
    assert np.array_equal(img64, np.asarray(im).transpose(2, 0, 1) / 255.0)


def test_degenerate_boxes_dropped_and_counted_and_crowd_ignored(tmp_path):
    write_coco(str(tmp_path), images=[(1, "x.png", rgb(100, 50)), (2, "y.png", rgb(30, 30))],
               annotations=[ann(1, 1, 1, (10, 10, 20, 20)),
                            ann(2, 1, 1, (30, 10, 0, 20)),        # zero width
                            ann(3, 1, 5, (120, 10, 10, 10)),      # entirely right of the image
                            ann(4, 1, 5, (90, 40, 30, 30)),       # partly outside: clipped
                            dict(ann(5, 1, 5, (0, 0, 50, 50)), iscrowd=1),   # crowd: ignored
                            ann(6, 2, 5, (5, 5, 10, -3))])        # negative height
    ds = open_split(str(tmp_path), "val", image_size=(32, 32))
    assert ds.num_degenerate == 3 and sorted(ds.degenerate_ann_ids) == [2, 3, 6]
    assert ds.num_crowd == 1
    _, t = ds[0]
    assert t["num_dropped"] == 2 and t["labels"].tolist() == [0, 1]
    np.testing.assert_allclose(t["boxes"][1], [95 / 100, 45 / 50, 10 / 100, 10 / 50], rtol=1e-6)
    _, t2 = ds[1]
    assert t2["num_dropped"] == 1 and len(t2["labels"]) == 0


def test_exif_orientation(tmp_path):
    base = np.zeros((20, 40, 3), np.uint8)      # stored 40 wide x 20 high
    base[:, :10] = (255, 0, 0)                  # red band on the left
    im = Image.fromarray(base, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6                            # display rotated 90 degrees clockwise
    path = str(tmp_path / "rot.png")
    im.save(path, exif=exif.tobytes())
    shown = read_image(path, exif="apply")
    assert shown.size == (20, 40)
    a = np.asarray(shown)
    assert (a[:10, :, 0] == 255).all() and (a[-10:, :, 0] == 0).all()   # the band is now on top
    assert read_image(path, exif="ignore").size == (40, 20)
    # auto: annotations in the displayed frame → rotate; in the stored frame → leave as is
    assert read_image(path, exif="auto", expected_size=(20, 40)).size == (20, 40)
    assert read_image(path, exif="auto", expected_size=(40, 20)).size == (40, 20)

    # through the dataset, normalised to the displayed (rotated) size
    img_dir = tmp_path / "ds" / "val2017"
    img_dir.mkdir(parents=True)
    im.save(str(img_dir / "rot.png"), exif=exif.tobytes())
    (tmp_path / "ds" / "annotations").mkdir()
    json.dump({"images": [{"id": 1, "file_name": "rot.png", "width": 20, "height": 40}],
               "annotations": [ann(1, 1, 1, (0, 0, 20, 10))], "categories": [{"id": 1, "name": "band"}]},
              open(tmp_path / "ds" / "annotations" / "instances_val2017.json", "w"))
    ds = open_split(str(tmp_path / "ds"), "val", image_size=(64, 32))
    img, t = ds[0]
    assert t["orig_size"].tolist() == [40, 20]
    np.testing.assert_allclose(t["boxes"][0], [0.5, 0.125, 1.0, 0.25])
    assert img[0, :8].min() > 0.99 and img[0, -8:].max() < 0.01   # red on top after rotation


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_image_modes_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (12, 16), dtype=np.uint8)
    if mode == "L":
        im = Image.fromarray(g, "L")
    elif mode == "I;16":
        im = Image.fromarray(g.astype(np.uint16) * 257)
    else:
        im = Image.fromarray(np.stack([g, 255 - g, g // 2], -1), "RGB").convert(mode)
    path = str(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    im.save(path)
    out = read_image(path)
    assert out.mode == "RGB" and out.size == (16, 12)
    arr = val_transform(out, (8, 8))
    assert arr.shape == (3, 8, 8) and arr.dtype == np.float32 and 0 <= arr.min() <= arr.max() <= 1
    if mode in ("L", "I;16"):
        a = np.asarray(out)
        assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
        assert np.array_equal(a[..., 0], g)
    if mode == "RGBA":   # alpha dropped, colours kept (torchvision's convert("RGB"))
        assert np.array_equal(np.asarray(out), np.stack([g, 255 - g, g // 2], -1))


# ---------------------------------------------------------------------------------------
# errors: one line, naming the file
# ---------------------------------------------------------------------------------------

def test_missing_annotation_file_and_folders(tmp_path):
    with pytest.raises(DataError) as e:
        open_split(str(tmp_path / "nope"), "val")
    assert "nope" in one_line(e)
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DataError) as e:
        open_split(str(tmp_path), "val")
    assert "annotations" in one_line(e)
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DataError) as e:
        open_split(str(tmp_path), "val")
    assert os.path.join("annotations", "instances_val2017.json") in one_line(e) and "not found" in str(e.value)
    with pytest.raises(DataError) as e:
        CocoDetection(str(tmp_path / "val2017"), str(tmp_path / "missing.json"))
    assert "missing.json: annotation file not found" in one_line(e)
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(DataError) as e:
        find_split(str(tmp_path), "train")
    assert "train2017" in one_line(e) and "image folder not found" in str(e.value)


def test_listed_image_missing(tmp_path):
    write_coco(str(tmp_path), images=[(1, "here.png", rgb(10, 10)), (2, "gone.png", None)],
               annotations=[ann(1, 2, 1, (0, 0, 5, 5))])
    with pytest.raises(DataError) as e:
        open_split(str(tmp_path), "val")
    msg = one_line(e)
    assert os.path.join("val2017", "gone.png") in msg and "image file not found" in msg and "image id 2" in msg
    ds = open_split(str(tmp_path), "val", check_files=False)
    ds[0]
    with pytest.raises(DataError) as e:
        ds[1]
    assert "gone.png" in one_line(e)


def test_corrupt_image(tmp_path):
    write_coco(str(tmp_path), images=[(1, "bad.png", None)])
    (tmp_path / "val2017" / "bad.png").write_bytes(b"not a png at all")
    ds = open_split(str(tmp_path), "val")
    with pytest.raises(DataError) as e:
        ds[0]
    assert "bad.png: cannot read image" in one_line(e)


@pytest.mark.parametrize("content,expect", [
    ('{"images": [', "not valid JSON (line 1"),
    ('[1, 2]', "top level must be a JSON object"),
    ('{"annotations": [], "categories": [{"id": 1}]}', "missing top-level key 'images'"),
    ('{"images": [{"id": 1}], "categories": [{"id": 1}]}', "images[0]: missing key 'file_name'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 4, "image_id": 1, "category_id": 1}]}', "annotations[0] (id 4): missing key 'bbox'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 4, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}]}',
     "key 'category_id' = 2 is not in 'categories'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 4, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]}',
     "key 'image_id' = 9 is not in 'images'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}], '
     '"annotations": [{"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]}',
     "key 'bbox' must be [x, y, w, h]"),
    ('{"images": [], "categories": []}', "key 'categories' is empty"),
])
def test_malformed_annotation_file(tmp_path, content, expect):
    p = tmp_path / "instances_val2017.json"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        load_coco_json(str(p))
    msg = one_line(e)
    assert msg.startswith(str(p) + ": ") and expect in msg, msg
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError):
        CocoDetection(str(tmp_path / "imgs"), str(p))
