"""COCO-format detection datasets, read with pycocotools, in the official RT-DETR way.

``CocoDetection(img_folder, ann_file, image_size=(H, W))[i]`` → ``(image, target)``:

* ``image``: float32 [3, H, W] RGB in [0, 1] — the official validation transform (resize to
  the model size without keeping the aspect, bilinear; no mean/std), see ``image.py``;
* ``target``: ``{"labels": int64 [n], "boxes": [n, 4] normalised cxcywh (relative to the
  ORIGINAL image size), "image_id": int, "orig_size": int64 [2] (h, w), "size": int64 [2]
  (H, W) of the returned image, "area": [n], "iscrowd": int64 [n] (zeros), "num_dropped": int}``.

As the official ``ConvertCocoPolysToMask``: crowd annotations (``iscrowd=1``) are ignored,
boxes are converted xywh → xyxy, clipped to the image, and boxes with no width or height
after clipping are dropped (counted: ``num_dropped`` per image, ``num_degenerate`` for the
whole file).  Images without boxes are kept.  Category ids become labels 0..K-1 by sorted id
(``category_map``; for COCO, ids 1..90 → labels 0..79, the official ``mscoco_category2label``).

Note: the official target keeps ``orig_size`` as (w, h); here it is (h, w), the order every
interface of this project uses (``Adapter.postprocess``, :mod:`rtdetr_core.postprocess`).

Problems with the files raise :class:`DataError` with a one-line message naming the file
(and, for an annotation file, the offending entry and key).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .categories import CategoryMap
from .errors import DataError
from .image import EXIF_MODES, read_image, val_transform

SPLIT_ALIASES = {"train": "train2017", "val": "val2017", "test": "test2017"}


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Silence pycocotools' prints (``loading annotations...``, ``index created!``...)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def validate_coco_dict(data: Any, src: str) -> Dict[str, Any]:
    """Check the parts of a COCO detection file this project reads; return it (``annotations``
    defaults to ``[]``).  Raises DataError naming ``src``, the entry and the key."""
    if not isinstance(data, dict):
        raise DataError(f"{src}: top level must be a JSON object with 'images', 'annotations', "
                        f"'categories', got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(f"{src}: missing top-level key '{key}' (not a COCO detection annotation file?)")
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DataError(f"{src}: key '{key}' must be a list, got {type(data[key]).__name__}")

    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            raise DataError(f"{src}: categories[{i}]: missing key 'id'")
        if not _is_int(c["id"]):
            raise DataError(f"{src}: categories[{i}]: key 'id' must be an integer, got {c['id']!r}")
        if c["id"] in cat_ids:
            raise DataError(f"{src}: categories[{i}]: duplicate category id {c['id']}")
        cat_ids.add(c["id"])
    if not cat_ids:
        raise DataError(f"{src}: key 'categories' is empty")

    img_ids = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{src}: images[{i}]: expected an object, got {type(im).__name__}")
        for key in ("id", "file_name"):
            if key not in im:
                raise DataError(f"{src}: images[{i}]: missing key '{key}'")
        if not _is_int(im["id"]):
            raise DataError(f"{src}: images[{i}]: key 'id' must be an integer, got {im['id']!r}")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DataError(f"{src}: images[{i}] (id {im['id']}): key 'file_name' must be a non-empty string")
        for key in ("width", "height"):
            if key in im and not (_is_int(im[key]) and im[key] > 0):
                raise DataError(f"{src}: images[{i}] (id {im['id']}): key '{key}' must be a positive integer, got {im[key]!r}")
        if im["id"] in img_ids:
            raise DataError(f"{src}: images[{i}]: duplicate image id {im['id']}")
        img_ids.add(im["id"])

    ann_ids = set()
    required = ("id", "image_id", "category_id", "bbox")
    for i, a in enumerate(data["annotations"]):
        if type(a) is not dict:
            raise DataError(f"{src}: annotations[{i}]: expected an object, got {type(a).__name__}")
        if not all(k in a for k in required):
            key = next(k for k in required if k not in a)
            where = f" (id {a['id']})" if "id" in a else ""
            raise DataError(f"{src}: annotations[{i}]{where}: missing key '{key}'")
        if a["id"] in ann_ids:
            raise DataError(f"{src}: annotations[{i}] (id {a['id']}): duplicate annotation id")
        ann_ids.add(a["id"])
        if a["image_id"] not in img_ids:
            raise DataError(f"{src}: annotations[{i}] (id {a['id']}): key 'image_id' = {a['image_id']!r} is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise DataError(f"{src}: annotations[{i}] (id {a['id']}): key 'category_id' = {a['category_id']!r} "
                            f"is not in 'categories'")
        if a.get("iscrowd", 0) not in (0, 1):
            raise DataError(f"{src}: annotations[{i}] (id {a['id']}): key 'iscrowd' must be 0 or 1, got {a['iscrowd']!r}")
    # boxes: one vectorised check, then find the culprit only if it fails
    anns = data["annotations"]
    ok = True
    if anns:
        try:
            bb = np.asarray([a["bbox"] for a in anns], dtype=np.float64)
            ok = bb.ndim == 2 and bb.shape[1] == 4 and bool(np.isfinite(bb).all())
        except (TypeError, ValueError):
            ok = False
    if not ok:
        for i, a in enumerate(anns):
            b = a["bbox"]
            if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_num(v) and np.isfinite(v) for v in b)):
                raise DataError(f"{src}: annotations[{i}] (id {a['id']}): key 'bbox' must be [x, y, w, h] "
                                f"finite numbers, got {b!r}")
    return data


def load_coco_json(ann_file: str) -> Dict[str, Any]:
    """Read and validate a COCO annotation file (one-line DataError on any problem)."""
    if not os.path.exists(ann_file):
        raise DataError(f"{ann_file}: annotation file not found")
    if os.path.isdir(ann_file):
        raise DataError(f"{ann_file}: is a folder, expected a COCO annotation .json file")
    try:
        with open(ann_file, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{ann_file}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: not valid JSON (not UTF-8 text: {e.reason})") from None
    return validate_coco_dict(data, ann_file)


def coco_from_dict(data: Dict[str, Any], verbose: bool = False):
    """A pycocotools ``COCO`` object from an (already validated) annotation dict."""
    from pycocotools.coco import COCO
    with quiet(not verbose):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def load_coco(ann_file: str, verbose: bool = False):
    """``pycocotools.coco.COCO`` of a validated annotation file."""
    return coco_from_dict(load_coco_json(ann_file), verbose=verbose)


def clip_boxes_xywh(bboxes: np.ndarray, w: Optional[float], h: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """COCO xywh (pixels) → xyxy clipped to ``[0, w] x [0, h]`` (float64), and the keep mask
    (positive width and height after clipping), as the official ``ConvertCocoPolysToMask``."""
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    if w is not None:
        xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, w)
    if h is not None:
        xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, h)
    keep = (xyxy[:, 3] > xyxy[:, 1]) & (xyxy[:, 2] > xyxy[:, 0])
    return xyxy, keep


class CocoDetection:
    """A COCO-format detection dataset (see the module docstring for the item format).

    Arguments:
      img_folder, ann_file: the images and their COCO annotation file.
      image_size: ``(H, W)`` of the returned images (``None``: original size).
      category_map: labels ⇄ category ids; default: the sorted ids of the file's categories
        (``CategoryMap.coco80()`` gives the same for COCO).  Every category of the file must
        be in it.
      dtype: of images and boxes (float32; float64 for the float64 runs).
      exif: ``"auto"`` (default), ``"apply"`` or ``"ignore"``, see :func:`image.read_image`.
      check_files: check at construction that every listed image file exists.
      verbose: let pycocotools print.

    Attributes: ``coco`` (pycocotools COCO), ``ids`` (sorted image ids, the item order),
    ``category_map``, ``label_to_category``, ``num_classes``, ``num_degenerate`` (non-crowd
    boxes of the file with no area after clipping to the image size given in the file),
    ``degenerate_ann_ids``, ``num_crowd``.
    """

    def __init__(self, img_folder: str, ann_file: str, image_size: Optional[Sequence[int]] = (640, 640), *,
                 category_map: Optional[CategoryMap] = None, dtype=np.float32, exif: str = "auto",
                 check_files: bool = True, verbose: bool = False):
        if exif not in EXIF_MODES:
            raise ValueError(f"exif must be one of {EXIF_MODES}, got {exif!r}")
        if image_size is not None:
            image_size = tuple(int(s) for s in image_size)
            if len(image_size) != 2 or min(image_size) <= 0:
                raise ValueError(f"image_size must be (H, W) positive integers, got {image_size}")
        if not os.path.isdir(img_folder):
            raise DataError(f"{img_folder}: image folder not found")
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.image_size = image_size
        self.dtype = np.dtype(dtype)
        self.exif = exif
        self.verbose = verbose

        data = load_coco_json(ann_file)
        self.coco = coco_from_dict(data, verbose=verbose)
        self.ids: List[int] = sorted(self.coco.imgs.keys())

        file_map = CategoryMap.from_categories(data["categories"])
        if category_map is None:
            category_map = file_map
        else:
            missing = [int(c) for c in file_map.label_to_category if int(c) not in category_map.category_to_label]
            if missing:
                raise DataError(f"{ann_file}: category id(s) {missing[:10]} not in the given category map {category_map}")
        self.category_map = category_map

        # Whole-file statistics (using the sizes written in the file; vectorised for COCO's 860k boxes).
        anns = data["annotations"]
        crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        self.num_crowd = int(crowd.sum())
        solid = [a for a, c in zip(anns, crowd) if not c]
        self.degenerate_ann_ids: List[int] = []
        if solid:
            imgs = self.coco.imgs
            bb = np.asarray([a["bbox"] for a in solid], dtype=np.float64)
            wh = np.asarray([(imgs[a["image_id"]].get("width", np.inf), imgs[a["image_id"]].get("height", np.inf))
                             for a in solid], dtype=np.float64)
            x1, y1 = np.clip(bb[:, 0], 0, wh[:, 0]), np.clip(bb[:, 1], 0, wh[:, 1])
            x2 = np.clip(bb[:, 0] + bb[:, 2], 0, wh[:, 0])
            y2 = np.clip(bb[:, 1] + bb[:, 3], 0, wh[:, 1])
            bad = ~((x2 > x1) & (y2 > y1))
            self.degenerate_ann_ids = [solid[i]["id"] for i in np.flatnonzero(bad)]

        if check_files:
            self._check_files()

    # -------------------------------------------------------------------------------------
    @property
    def num_degenerate(self) -> int:
        return len(self.degenerate_ann_ids)

    @property
    def label_to_category(self) -> np.ndarray:
        return self.category_map.label_to_category

    @property
    def num_classes(self) -> int:
        return self.category_map.num_classes

    def __len__(self) -> int:
        return len(self.ids)

    def box_counts(self) -> List[int]:
        """Non-crowd annotations per item, from the file (no image read; degenerate boxes,
        dropped when an item is loaded, still count)."""
        return [sum(1 for a in self.coco.imgToAnns.get(i, []) if not a.get("iscrowd", 0)) for i in self.ids]

    def __repr__(self) -> str:
        return (f"CocoDetection({len(self)} images, {len(self.coco.anns)} annotations, K={self.num_classes}, "
                f"image_size={self.image_size}, ann_file={self.ann_file!r})")

    def image_path(self, index: int) -> str:
        return os.path.join(self.img_folder, self.coco.imgs[self.ids[index]]["file_name"])

    def _check_files(self) -> None:
        try:
            present = set(os.listdir(self.img_folder))
        except OSError as e:
            raise DataError(f"{self.img_folder}: cannot list image folder ({e})") from None
        missing = []
        for img_id in self.ids:
            name = self.coco.imgs[img_id]["file_name"]
            ok = name in present if ("/" not in name and os.sep not in name) else \
                os.path.isfile(os.path.join(self.img_folder, name))
            if not ok:
                missing.append((img_id, name))
        if missing:
            img_id, name = missing[0]
            more = f"; {len(missing)} of {len(self.ids)} listed images are missing" if len(missing) > 1 else ""
            raise DataError(f"{os.path.join(self.img_folder, name)}: image file not found "
                            f"(listed in {self.ann_file} as image id {img_id}{more})")

    def load_image(self, index: int):
        """The original image (PIL, RGB, EXIF handled)."""
        info = self.coco.imgs[self.ids[index]]
        expected = (info["width"], info["height"]) if "width" in info and "height" in info else None
        path = self.image_path(index)
        if not os.path.exists(path):
            raise DataError(f"{path}: image file not found (listed in {self.ann_file} as image id {info['id']})")
        return read_image(path, exif=self.exif, expected_size=expected)

    def make_target(self, index: int, orig_wh: Tuple[int, int]) -> Dict[str, Any]:
        """The target of item ``index`` for an original image of size ``orig_wh`` (w, h)."""
        img_id = self.ids[index]
        w, h = int(orig_wh[0]), int(orig_wh[1])
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        xyxy, keep = clip_boxes_xywh([a["bbox"] for a in anns], w, h)
        xyxy = xyxy[keep]
        cats = np.asarray([a["category_id"] for a in anns], dtype=np.int64)[keep]
        area = np.asarray([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64)[keep]
        cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                           (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], axis=1) \
            if len(xyxy) else np.zeros((0, 4))
        out_h, out_w = self.image_size if self.image_size is not None else (h, w)
        return {
            "labels": self.category_map.to_labels(cats).reshape(-1),
            "boxes": cxcywh.astype(self.dtype).reshape(-1, 4),
            "image_id": int(img_id),
            "orig_size": np.asarray([h, w], dtype=np.int64),
            "size": np.asarray([out_h, out_w], dtype=np.int64),
            "area": area.astype(self.dtype),
            "iscrowd": np.zeros(len(cats), dtype=np.int64),
            "num_dropped": int((~keep).sum()),
        }

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        img = self.load_image(index)
        target = self.make_target(index, img.size)
        image = val_transform(img, self.image_size, self.dtype)
        return image, target


# ----------------------------------------------------------------------------------------
# Real COCO layout
# ----------------------------------------------------------------------------------------

def find_split(root: str, split: str) -> Tuple[str, str]:
    """``(img_folder, ann_file)`` of a split in the COCO layout::

        <root>/train2017/  <root>/val2017/  <root>/annotations/instances_{train,val}2017.json

    ``split`` is ``train``/``val`` (→ ``train2017``/``val2017``) or a folder name
    (``val2017``, ``mysplit`` → ``annotations/instances_mysplit.json``)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset root folder not found")
    name = SPLIT_ALIASES.get(split, split)
    ann_file = os.path.join(root, "annotations", f"instances_{name}.json")
    img_folder = os.path.join(root, name)
    if not os.path.isdir(os.path.join(root, "annotations")):
        raise DataError(f"{os.path.join(root, 'annotations')}: annotations folder not found "
                        f"(expected COCO layout: <root>/annotations/instances_{name}.json, <root>/{name}/)")
    if not os.path.isfile(ann_file):
        have = sorted(f for f in os.listdir(os.path.join(root, "annotations")) if f.endswith(".json"))
        raise DataError(f"{ann_file}: annotation file not found (present: {', '.join(have) or 'none'})")
    if not os.path.isdir(img_folder):
        raise DataError(f"{img_folder}: image folder not found (expected COCO layout <root>/{name}/)")
    return img_folder, ann_file


def open_split(root: str, split: str, image_size: Optional[Sequence[int]] = (640, 640), **kwargs) -> CocoDetection:
    """``CocoDetection`` of ``split`` (``train``/``val``) of a COCO-layout dataset at ``root``
    (real COCO 2017 or the bundled synthetic set).  ``kwargs`` go to ``CocoDetection``."""
    img_folder, ann_file = find_split(root, split)
    return CocoDetection(img_folder, ann_file, image_size, **kwargs)
