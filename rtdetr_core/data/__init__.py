"""Data pipeline of rtdetr-parity (numpy + Pillow + pycocotools only).

* :mod:`.coco` — ``CocoDetection`` (COCO-format reader, official validation transform),
  ``open_split`` (real COCO layout), ``DataError``;
* :mod:`.categories` — ``CategoryMap`` (category ids ⇄ labels 0..K-1), COCO's 80 ids;
* :mod:`.synthetic` — the bundled synthetic dataset (``ensure_synthetic_dataset``, ``describe``);
* :mod:`.synthetic_draw` — one synthetic image and its exact boxes (``draw_image``);
* :mod:`.loader` — seeded epoch order, batching, multi-scale and denoising draws;
* :mod:`.source` — ``resolve_data``: ``--data`` (None, ``synthetic:SEED:N_TRAIN:N_VAL`` or a folder) to a folder.
"""
from .categories import COCO_CATEGORIES, COCO_CATEGORY_IDS, CategoryMap  # noqa: F401
from .coco import CocoDetection, find_split, load_coco, load_coco_json, open_split  # noqa: F401
from .errors import DataError  # noqa: F401
from .loader import BatchLoader, collate, iterate_batches, loader_from_config  # noqa: F401
from .synthetic import (SYNTHETIC_CATEGORIES, describe, ensure_synthetic_dataset,  # noqa: F401
                        generate_synthetic_dataset)
from .source import resolve_data  # noqa: F401
