"""The bundled synthetic detection dataset: COCO layout, drawn shapes, exact boxes.

``ensure_synthetic_dataset(seed=0, n_train=50, n_val=50)`` returns a folder laid out as
real COCO 2017, so every reader of COCO reads it unchanged::

    <root>/train2017/000000000001.png ...      <root>/val2017/000000100001.png ...
    <root>/annotations/instances_train2017.json  instances_val2017.json
    <root>/.done                                 (marker: sha256 of every file)

Content (drawn by :mod:`.synthetic_draw`; see :func:`describe` for the counts of a given build):

* six categories of filled shapes with NON-contiguous COCO-like ids (labels 0..5 by sorted
  id): 1 rectangle, 3 ellipse, 7 triangle, 12 cross, 18 ring, 25 star;
* non-square images, each side drawn in 320..640 px, on textured backgrounds (colour
  gradient, smooth low-frequency blotches, stripes, pixel noise);
* 1..8 objects per image, 15..30 on every image whose index ends in 5 (5 of 50), and
  exactly ONE image without objects per split; sizes from ~10 px to ~60 % of the short side
  (small, medium and large COCO areas all occur); objects may leave the image (boxes
  clipped) and may occlude earlier ones (each keeps at least half of its pixels visible);
* boxes are exact: the tight box of the object's VISIBLE pixels (integer pixel edges,
  ``[x, y, w, h]`` with the right/bottom edge exclusive); ``area`` = visible pixel count.

Reproducible: image ``i`` of a split is drawn from ``default_rng([seed, split, i])`` alone;
PNGs are written with fixed parameters and no metadata, JSON with sorted keys, no spaces
and integers only, so the same seed gives byte-for-byte identical files.  The build goes to
a temporary folder beside the target and is renamed into place with the marker, so an
interrupted or concurrent build never leaves a half-written dataset behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional

import numpy as np
from PIL import Image

from .errors import DataError
from .synthetic_draw import SPLIT_KEY, SYNTHETIC_CATEGORIES, draw_image

VERSION = "v1"
SPLITS = ("train", "val")
_IMAGE_ID_BASE = {"train": 1, "val": 100001}
_ANN_ID_BASE = {"train": 1, "val": 10000001}
MAX_IMAGES = 99999
MARKER = ".done"
PNG_PARAMS = {"format": "PNG", "compress_level": 1, "optimize": False}
CACHE_ENV = "RTDETR_PARITY_CACHE"


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------

def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                       allow_nan=False) + "\n").encode("ascii")


def _empty_index(seed: int, split: str, n: int) -> int:
    return int(np.random.default_rng([seed, SPLIT_KEY[split], 999999]).integers(0, n))


def _check_args(seed: int, n_train: int, n_val: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"{name} must be an integer in 1..{MAX_IMAGES}, got {n!r}")


def generate_split(root: str, split: str, n: int, seed: int) -> Dict[str, Any]:
    """Draw and write ``n`` images of ``split`` and return its COCO dict (also written)."""
    img_dir = os.path.join(root, f"{split}2017")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    empty = _empty_index(seed, split, n)

    def one(i: int):
        arr, objects = draw_image(seed, split, i, empty)
        img_id = _IMAGE_ID_BASE[split] + i
        fname = f"{img_id:012d}.png"
        Image.fromarray(arr, "RGB").save(os.path.join(img_dir, fname), **PNG_PARAMS)
        return img_id, fname, arr.shape, objects

    # Images are independent (own generator, own file): threads only change the speed
    # (numpy and Pillow's PNG encoder release the GIL), never the bytes written.
    workers = max(1, min(4, os.cpu_count() or 1, n))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            drawn = list(pool.map(one, range(n)))
    else:
        drawn = [one(i) for i in range(n)]
    images, anns = [], []
    ann_id = _ANN_ID_BASE[split]
    for img_id, fname, shape, objects in drawn:
        images.append({"id": img_id, "file_name": fname, "width": int(shape[1]), "height": int(shape[0])})
        for cat, x, y, bw, bh, area in objects:
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": area, "iscrowd": 0})
            ann_id += 1
    data = {
        "info": {"description": "rtdetr-parity synthetic shapes", "version": VERSION, "seed": int(seed),
                 "split": split, "url": "", "year": 2017, "contributor": "rtdetr_core.data.synthetic",
                 "date_created": ""},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [dict(c, supercategory="shape") for c in SYNTHETIC_CATEGORIES],
    }
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "wb") as fh:
        fh.write(_dump_json(data))
    return data


def _manifest(root: str) -> Dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            if rel == MARKER:
                continue
            with open(p, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return dict(sorted(out.items()))


def generate_synthetic_dataset(out_dir: str, seed: int = 0, n_train: int = 50, n_val: int = 50) -> str:
    """Write the dataset (both splits and the marker) into ``out_dir`` (created; must be empty
    or absent).  No caching, no atomic rename: see :func:`ensure_synthetic_dataset`."""
    _check_args(seed, n_train, n_val)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise DataError(f"{out_dir}: output folder is not empty")
    os.makedirs(out_dir, exist_ok=True)
    generate_split(out_dir, "train", int(n_train), int(seed))
    generate_split(out_dir, "val", int(n_val), int(seed))
    marker = {"generator": "rtdetr_core.data.synthetic", "version": VERSION, "seed": int(seed),
              "n_train": int(n_train), "n_val": int(n_val), "files": _manifest(out_dir)}
    with open(os.path.join(out_dir, MARKER), "wb") as fh:
        fh.write(_dump_json(marker))
    return out_dir


def default_cache_dir() -> str:
    """``$RTDETR_PARITY_CACHE`` or ``~/.cache/rtdetr-parity``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rtdetr-parity")


def dataset_dirname(seed: int, n_train: int, n_val: int) -> str:
    return f"synthetic-{int(seed)}-{int(n_train)}-{int(n_val)}-{VERSION}"


def verify_synthetic_dataset(root: str) -> None:
    """Re-hash every file against the marker; DataError naming the first file that differs."""
    mpath = os.path.join(root, MARKER)
    if not os.path.isfile(mpath):
        raise DataError(f"{mpath}: done-marker not found (incomplete synthetic dataset)")
    with open(mpath, "rb") as fh:
        want = json.loads(fh.read())["files"]
    have = _manifest(root)
    for rel in sorted(set(want) | set(have)):
        if want.get(rel) != have.get(rel):
            state = "missing" if rel not in have else ("unexpected" if rel not in want else "modified")
            raise DataError(f"{os.path.join(root, rel)}: {state} (synthetic dataset differs from its marker)")


def _remove_stale_builds(base: str, prefix: str, age_s: float = 3600.0) -> None:
    """Temporary build folders left by a killed process (older than an hour) are removed."""
    now = time.time()
    for name in os.listdir(base):
        p = os.path.join(base, name)
        try:
            if name.startswith(prefix) and now - os.stat(p).st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_synthetic_dataset(seed: int = 0, n_train: int = 50, n_val: int = 50, *,
                             cache_dir: Optional[str] = None, verify: bool = False) -> str:
    """Path of the synthetic dataset ``(seed, n_train, n_val)``, generated on first use into
    ``<cache_dir>/synthetic-<seed>-<n_train>-<n_val>-v1/`` (``cache_dir`` default:
    :func:`default_cache_dir`).  Built in a temporary sibling folder, then renamed into
    place: a folder with the done-marker is always complete.  ``verify``: re-hash the files."""
    _check_args(seed, n_train, n_val)
    base = cache_dir or default_cache_dir()
    target = os.path.join(base, dataset_dirname(seed, n_train, n_val))
    if os.path.isfile(os.path.join(target, MARKER)):
        if verify:
            verify_synthetic_dataset(target)
        return target
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:
        raise DataError(f"{base}: cannot create the cache folder ({e}); set ${CACHE_ENV}") from None
    prefix = f".{dataset_dirname(seed, n_train, n_val)}.tmp-"
    _remove_stale_builds(base, prefix)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=base)
    try:
        generate_synthetic_dataset(tmp, seed, n_train, n_val)
        os.chmod(tmp, 0o755)        # mkdtemp makes it private; the cache is a normal folder
        if os.path.isdir(target) and not os.path.isfile(os.path.join(target, MARKER)):
            shutil.rmtree(target, ignore_errors=True)     # leftover without marker: never valid
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, MARKER)):   # not a concurrent winner
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def describe(root: Optional[str] = None) -> Dict[str, Any]:
    """Counts of a synthetic (or any COCO-layout) dataset: per split the number of images,
    boxes, boxes per class name, images without boxes, most boxes in one image, image side
    ranges and COCO area buckets.  ``root=None``: the default dataset (generated if needed)."""
    root = root or ensure_synthetic_dataset()
    info: Dict[str, Any] = OrderedDict(root=root)
    for split in SPLITS:
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        if not os.path.isfile(path):
            continue
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
        names = {c["id"]: c["name"] for c in data["categories"]}
        per_img: Dict[int, int] = {im["id"]: 0 for im in data["images"]}
        per_cls = OrderedDict((names[c], 0) for c in sorted(names))
        areas = {"small": 0, "medium": 0, "large": 0}
        for a in data["annotations"]:
            per_img[a["image_id"]] += 1
            per_cls[names[a["category_id"]]] += 1
            ar = a.get("area", a["bbox"][2] * a["bbox"][3])
            areas["small" if ar < 32 ** 2 else "medium" if ar < 96 ** 2 else "large"] += 1
        ws = [im["width"] for im in data["images"]]
        hs = [im["height"] for im in data["images"]]
        counts = list(per_img.values())
        info[split] = OrderedDict(
            images=len(data["images"]), boxes=len(data["annotations"]),
            per_class=per_cls,
            categories=OrderedDict((str(c), names[c]) for c in sorted(names)),
            empty_images=sum(1 for c in counts if c == 0),
            max_boxes_per_image=max(counts) if counts else 0,
            images_with_15_plus=sum(1 for c in counts if c >= 15),
            width_range=[min(ws), max(ws)] if ws else None,
            height_range=[min(hs), max(hs)] if hs else None,
            area_buckets=areas,
        )
    return info
