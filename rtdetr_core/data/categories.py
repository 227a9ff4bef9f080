"""Category ids of a dataset ⇄ contiguous labels ``0..K-1``.

Labels are the positions of the **sorted** category ids, exactly as the official RT-DETR
``mscoco_category2label`` (built from the sorted keys of ``mscoco_category2name``): for
COCO, the 80 used ids out of the 91-id space (1..90, with 12, 26, 29, 30, 45, 66, 68, 69,
71, 83 unused) become labels 0..79.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from .errors import DataError

# The 80 COCO 2017 detection categories (id -> name), as in instances_*2017.json.
COCO_CATEGORIES: Dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}
COCO_CATEGORY_IDS: List[int] = sorted(COCO_CATEGORIES)
assert len(COCO_CATEGORY_IDS) == 80


class CategoryMap:
    """Bidirectional map between (possibly non-contiguous) category ids and labels 0..K-1.

    ``label_to_category``: int64 array [K] (sorted ids); ``category_to_label``: dict id→label;
    ``names``: list of K names (by label).
    """

    def __init__(self, category_ids: Iterable[int], names: Optional[Mapping[int, str]] = None):
        ids = [int(c) for c in category_ids]
        if not ids:
            raise DataError("category map: no categories")
        if len(set(ids)) != len(ids):
            dup = sorted({c for c in ids if ids.count(c) > 1})
            raise DataError(f"category map: duplicate category id(s) {dup}")
        ids = sorted(ids)
        self.label_to_category = np.asarray(ids, dtype=np.int64)
        self.label_to_category.setflags(write=False)
        self.category_to_label: Dict[int, int] = {c: i for i, c in enumerate(ids)}
        names = dict(names or {})
        self.names: List[str] = [str(names.get(c, c)) for c in ids]
        # Dense lookup table id -> label (-1 = unknown), for vectorised mapping.
        self._lut = np.full(ids[-1] + 1, -1, dtype=np.int64) if ids[0] >= 0 else None
        if self._lut is not None:
            self._lut[self.label_to_category] = np.arange(len(ids))

    @classmethod
    def coco80(cls) -> "CategoryMap":
        """The official COCO map: 80 ids of the 91-id space → labels 0..79."""
        return cls(COCO_CATEGORY_IDS, COCO_CATEGORIES)

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping]) -> "CategoryMap":
        """From a COCO ``categories`` list (``[{"id":..., "name":...}, ...]``)."""
        return cls([c["id"] for c in categories], {int(c["id"]): c.get("name", c["id"]) for c in categories})

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category)

    def to_labels(self, category_ids) -> np.ndarray:
        """Category ids (scalar or array) → int64 labels; an unknown id raises DataError."""
        ids = np.asarray(category_ids, dtype=np.int64)
        if self._lut is not None:
            ok = (ids >= 0) & (ids < len(self._lut))
            out = np.where(ok, self._lut[np.where(ok, ids, 0)], -1)
        else:
            out = np.vectorize(lambda c: self.category_to_label.get(int(c), -1), otypes=[np.int64])(ids)
        if np.any(out < 0):
            bad = sorted({int(c) for c in np.atleast_1d(ids)[np.atleast_1d(out) < 0]})
            raise DataError(f"category map: unknown category id(s) {bad[:10]} "
                            f"(known: {self.label_to_category.tolist()})")
        return out.astype(np.int64)

    def to_categories(self, labels) -> np.ndarray:
        """Labels 0..K-1 (scalar or array) → int64 category ids; out of range raises DataError."""
        lab = np.asarray(labels, dtype=np.int64)
        if np.any((lab < 0) | (lab >= self.num_classes)):
            bad = sorted({int(x) for x in np.atleast_1d(lab) if x < 0 or x >= self.num_classes})
            raise DataError(f"category map: label(s) {bad[:10]} out of range 0..{self.num_classes - 1}")
        return self.label_to_category[lab]

    def __len__(self) -> int:
        return self.num_classes

    def __eq__(self, other) -> bool:
        return isinstance(other, CategoryMap) and np.array_equal(self.label_to_category, other.label_to_category)

    def __repr__(self) -> str:
        ids = self.label_to_category.tolist()
        shown = ids if len(ids) <= 8 else ids[:4] + ["..."] + ids[-2:]
        return f"CategoryMap(K={self.num_classes}, ids={shown})"
