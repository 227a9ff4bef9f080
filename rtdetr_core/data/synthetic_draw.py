"""Drawing one image of the bundled synthetic dataset (``synthetic.py`` lays the images out as
COCO and writes them): a textured background and 1..8 (or 15..30) filled shapes of six
categories, with each object's exact visible-pixel box.

Image ``index`` of a split is drawn from ``default_rng([seed, SPLIT_KEY[split], index])`` alone,
so any image can be redrawn without the others.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SYNTHETIC_CATEGORIES: List[Dict[str, Any]] = [
    {"id": 1, "name": "rectangle"},
    {"id": 3, "name": "ellipse"},
    {"id": 7, "name": "triangle"},
    {"id": 12, "name": "cross"},
    {"id": 18, "name": "ring"},
    {"id": 25, "name": "star"},
]
SPLIT_KEY = {"train": 0, "val": 1}      # the second word of every image's rng seed
MIN_SIDE, MAX_SIDE = 320, 640


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Textured background, uint8 [h, w, 3]."""
    c0 = rng.integers(30, 226, 3).astype(np.float32)
    c1 = rng.integers(30, 226, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    t = np.add.outer(ys * math.sin(ang), xs * math.cos(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + (c1 - c0) * t[..., None]
    # smooth low-frequency blotches
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    grid = rng.integers(0, 256, (gh, gw, 3)).astype(np.uint8)
    blot = np.asarray(Image.fromarray(grid, "RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += (blot - 128.0) * rng.uniform(0.15, 0.45)
    # faint stripes on some images
    if rng.random() < 0.5:
        period = rng.uniform(8, 40)
        sang = rng.uniform(0, math.pi)
        # triangle wave: only IEEE-exact arithmetic, identical under numpy 1.26 and 2.x
        # (vectorised transcendental functions may differ in the last bit between versions)
        u = np.add.outer(ys * math.sin(sang), xs * math.cos(sang)) * (1.0 / period)
        s = np.abs(2.0 * (u - np.floor(u)) - 1.0) * 2.0 - 1.0
        img += (s * rng.uniform(4, 14))[..., None]
    return np.clip(img, 0, 255)


def _polygon(cx: float, cy: float, pts: List[Tuple[float, float]], ang: float) -> List[Tuple[float, float]]:
    ca, sa = math.cos(ang), math.sin(ang)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, rw: float, rh: float,
                rng: np.random.Generator) -> None:
    """Draw one filled shape with value 255 into an 'L' mask (half-sizes rw, rh)."""
    box = [cx - rw, cy - rh, cx + rw, cy + rh]
    ang = float(rng.uniform(0, 2 * math.pi))
    if name == "rectangle":
        draw.rectangle(box, fill=255)
    elif name == "ellipse":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        width = max(2, int(round(min(rw, rh) * rng.uniform(0.2, 0.45))))
        draw.ellipse(box, outline=255, width=width)
    elif name == "triangle":
        pts = [(0.0, -rh), (rw, rh), (-rw, rh)]
        draw.polygon(_polygon(cx, cy, pts, ang), fill=255)
    elif name == "cross":
        a, b = rw, max(rw * rng.uniform(0.22, 0.4), 1.5)
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
               (-a, -b), (-b, -b)]
        draw.polygon(_polygon(cx, cy, pts, ang), fill=255)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            r = rw if k % 2 == 0 else rw * inner
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(t), r * math.sin(t)))
        draw.polygon(_polygon(cx, cy, pts, ang), fill=255)
    else:  # pragma: no cover
        raise ValueError(name)


def _color_far_from(rng: np.random.Generator, ref: np.ndarray) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(8):
        c = rng.integers(0, 256, 3)
        d = float(np.abs(c - ref).sum())
        if d > best_d:
            best, best_d = c, d
        if d >= 200:
            break
    return best.astype(np.uint8)


def draw_image(seed: int, split: str, index: int, empty_index: int, return_owner: bool = False):
    """Image ``index`` of ``split``: (uint8 [h, w, 3], objects list of (category_id, x, y, w, h, area))
    (+ the int16 [h, w] map of the object owning each pixel, -1 = background, if ``return_owner``)."""
    rng = np.random.default_rng([seed, SPLIT_KEY[split], index])
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    if w == h:
        w = w + 1 if w < MAX_SIDE else w - 1
    img = _background(rng, w, h)

    if index == empty_index:
        n_obj = 0
    elif index % 10 == 5:
        n_obj = int(rng.integers(15, 31))
    else:
        n_obj = int(rng.integers(1, 9))

    owner = np.full((h, w), -1, dtype=np.int16)     # index of the topmost object per pixel
    full: List[int] = []                            # drawn pixel count per object
    visible: List[int] = []
    cats: List[int] = []
    windows: List[Tuple[int, int, int, int]] = []
    short = min(w, h)
    for _ in range(n_obj):
        for _try in range(25):
            cat = SYNTHETIC_CATEGORIES[int(rng.integers(0, len(SYNTHETIC_CATEGORIES)))]
            size = math.exp(rng.uniform(math.log(10), math.log(0.6 * short)))
            aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            rw, rh = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2
            if cat["name"] in ("cross", "star"):
                rh = rw
            # the centre may lie slightly outside the image: the box is then clipped
            cx = rng.uniform(-0.15 * rw, w + 0.15 * rw)
            cy = rng.uniform(-0.15 * rh, h + 0.15 * rh)
            r = max(rw, rh) * 1.5 + 2
            x0, y0 = max(int(cx - r), 0), max(int(cy - r), 0)
            x1, y1 = min(int(cx + r) + 1, w), min(int(cy + r) + 1, h)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            mimg = Image.new("L", (x1 - x0, y1 - y0), 0)
            _draw_shape(ImageDraw.Draw(mimg), cat["name"], cx - x0, cy - y0, rw, rh, rng)
            m = np.asarray(mimg) > 0
            npix = int(m.sum())
            if npix < 40:
                continue
            under = owner[y0:y1, x0:x1][m]
            covered = np.bincount(under[under >= 0], minlength=len(full)) if len(full) else np.zeros(0, int)
            if any(visible[j] - covered[j] < 0.5 * full[j] for j in np.flatnonzero(covered)):
                continue   # would hide more than half of an earlier object
            k = len(full)
            for j in np.flatnonzero(covered):
                visible[j] -= int(covered[j])
            owner[y0:y1, x0:x1][m] = k
            region = img[y0:y1, x0:x1]
            colour = _color_far_from(rng, region[m].astype(np.float64).mean(axis=0))
            shade = rng.uniform(-18, 18, 3)            # a little tint variation inside the shape
            region[m] = np.clip(colour.astype(np.float32) + shade, 0, 255)
            full.append(npix)
            visible.append(npix)
            cats.append(int(cat["id"]))
            windows.append((x0, y0, x1, y1))
            break

    # pixel noise over everything, then quantise
    img += rng.standard_normal(img.shape, dtype=np.float32) * 2.0
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = []
    for k, (cat, (x0, y0, x1, y1)) in enumerate(zip(cats, windows)):
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == k)
        if len(xs) == 0:   # cannot happen (>= half visible), kept for safety
            continue
        bx0, by0 = int(xs.min()) + x0, int(ys.min()) + y0
        bx1, by1 = int(xs.max()) + x0 + 1, int(ys.max()) + y0 + 1
        objects.append((cat, bx0, by0, bx1 - bx0, by1 - by0, int(len(xs))))
    return (out, objects, owner) if return_owner else (out, objects)
