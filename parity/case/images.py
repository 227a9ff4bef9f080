"""The inputs of ``parity detect``: image files read once (Pillow, EXIF orientation, RGB) and
resized with the official validation transform, or a preprocessed ``.npy`` batch; the
label -> category mapping of the outputs (``Categories``) and the COCO results with category
names."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from rtdetr_core.data import CategoryMap, DataError
from rtdetr_core.data.coco import load_coco_json
from rtdetr_core.data.image import read_image, val_transform

from parity.errors import UsageError



def parse_size(text: Optional[str], default: Sequence[int]) -> Tuple[int, int]:
    if text is None:
        h, w = int(default[0]), int(default[1])
    else:
        parts = text.lower().replace("*", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--size {text!r}: expected N or HxW") from None
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2:
            raise UsageError(f"--size {text!r}: expected N or HxW")
        h, w = vals
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise UsageError(f"image size {h}x{w}: height and width must be positive multiples of 32")
    return h, w


def load_images(paths: Sequence[str], size_hw: Tuple[int, int]):
    """-> (batch [N,3,H,W] float32, originals (PIL), orig_sizes [N,2] (h, w))."""

    arrays, originals, sizes = [], [], []
    for p in paths:
        if os.path.isdir(p):
            raise UsageError(f"{p}: is a folder, not an image file")
        try:
            img = read_image(p, exif="apply")
        except DataError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"{p}: cannot read image ({e.strerror or e})") from None
        originals.append(img)
        sizes.append((img.size[1], img.size[0]))
        arrays.append(val_transform(img, size_hw, np.float32))
    return np.stack(arrays), originals, np.asarray(sizes, dtype=np.int64)


def load_input(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: input file not found")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad file
        raise UsageError(f"{path}: cannot read as .npy ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(x, np.ndarray):
        raise UsageError(f"{path}: expected one array (.npy), got an archive")
    if x.ndim != 4 or x.shape[1] != 3:
        raise UsageError(f"{path}: expected shape [B,3,H,W], got {list(x.shape)}")
    if x.dtype != np.float32:
        raise UsageError(f"{path}: expected float32, got {x.dtype}")
    b, _, h, w = x.shape
    if b == 0 or h == 0 or w == 0:
        raise UsageError(f"{path}: empty batch {list(x.shape)}")
    if h % 32 or w % 32:
        raise UsageError(f"{path}: H and W must be multiples of 32, got {h}x{w}")
    if not np.all(np.isfinite(x)):
        raise UsageError(f"{path}: holds NaN/inf values")
    return np.ascontiguousarray(x)


class Categories:
    """Labels -> (category id, name) for ``parity detect``; a label beyond the map has no
    category and is dropped from the COCO results (counted)."""

    def __init__(self, spec: str, num_classes: int):
        self.source = spec
        self.map = None
        if spec == "auto":
            spec = "coco" if num_classes == 80 else "none"
            self.source = f"auto ({spec})"
        if spec == "coco":
            self.map = CategoryMap.coco80()
        elif spec != "none":
            try:
                data = load_coco_json(spec)
                self.map = CategoryMap.from_categories(data["categories"])
            except (DataError, KeyError, TypeError) as e:
                raise UsageError(f"--categories {spec}: {e}") from None

    def lut(self, num_classes: int) -> np.ndarray:
        """int64 [num_classes]: label -> category id (the labels themselves without a map)."""
        if self.map is None:
            return np.arange(num_classes, dtype=np.int64)
        return np.asarray(self.map.label_to_category, dtype=np.int64)

    def add_names(self, results: List[Dict[str, Any]]) -> None:
        """``category_name`` on each COCO result, when the categories have names."""
        if self.map is None:
            return
        names = dict(zip(self.map.label_to_category.tolist(), self.map.names))
        for r in results:
            r["category_name"] = names[r["category_id"]]

    def name(self, label: int) -> str:
        if self.map is None:
            return str(int(label))
        return self.map.names[label] if 0 <= label < self.map.num_classes else f"#{int(label)}"

    def coco_categories(self, num_classes: int) -> List[Dict[str, Any]]:
        if self.map is None:
            return [{"id": i, "name": str(i)} for i in range(num_classes)]
        return [{"id": int(c), "name": n} for c, n in zip(self.map.label_to_category.tolist(), self.map.names)]
