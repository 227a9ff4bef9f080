"""Annotated PNGs for ``parity detect``: one panel per backend, side by side.

Each panel is the original image (scaled so its longer side is at most ``max_side``) with
every detection scoring at least ``conf``: box, ``name score`` label; a title bar names the
backend and how many detections it shows.  Colours are fixed per label, so the same object
has the same colour in both panels.  Pillow only (no matplotlib: fast and headless).
"""
from __future__ import annotations

import colorsys
import io
from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TITLE_H = 22
GAP = 6


def label_color(label: int) -> Tuple[int, int, int]:
    h = (int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)      # Pillow >= 10.1: scalable default font
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def draw_panel(img: Image.Image, dets: Mapping[str, np.ndarray], conf: float, title: str,
               name_of: Callable[[int], str], scale: float) -> Image.Image:
    """One annotated panel (title bar on top)."""
    w, h = img.size
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    base = img.convert("RGB").resize((sw, sh), Image.BILINEAR) if (sw, sh) != (w, h) else img.convert("RGB").copy()
    panel = Image.new("RGB", (sw, sh + TITLE_H), (255, 255, 255))
    panel.paste(base, (0, TITLE_H))
    d = ImageDraw.Draw(panel)
    font = _font(12)
    scores = np.asarray(dets["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(dets["labels"]).reshape(-1)
    boxes = np.asarray(dets["boxes"], dtype=np.float64).reshape(-1, 4)
    keep = np.flatnonzero(scores >= conf)
    keep = keep[np.argsort(scores[keep], kind="stable")]        # draw the best last (on top)
    for i in keep:
        x0, y0, x1, y1 = (boxes[i] * scale).tolist()
        y0 += TITLE_H
        y1 += TITLE_H
        col = label_color(int(labels[i]))
        d.rectangle([x0, y0, x1, y1], outline=col, width=2)
        txt = f"{name_of(int(labels[i]))} {scores[i]:.2f}"
        tw, th = _text_size(d, txt, font)
        ty = y0 - th - 3 if y0 - th - 3 >= TITLE_H else y0 + 1
        d.rectangle([x0, ty, x0 + tw + 4, ty + th + 3], fill=col)
        d.text((x0 + 2, ty), txt, fill=(0, 0, 0), font=font)
    d.rectangle([0, 0, sw, TITLE_H - 1], fill=(40, 40, 40))
    d.text((4, 4), f"{title}: {len(keep)} detections >= {conf:g}", fill=(255, 255, 255), font=font)
    return panel


def side_by_side(img: Image.Image, panels: Sequence[Tuple[str, Mapping[str, np.ndarray]]], conf: float,
                 name_of: Callable[[int], str], max_side: int = 640, footer: Optional[str] = None) -> Image.Image:
    """Panels of every backend next to each other (optional footer line)."""
    w, h = img.size
    scale = min(1.0, max_side / float(max(w, h)))
    parts = [draw_panel(img, dets, conf, title, name_of, scale) for title, dets in panels]
    fh = 18 if footer else 0
    W = sum(p.width for p in parts) + GAP * (len(parts) - 1)
    H = max(p.height for p in parts) + fh
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    x = 0
    for p in parts:
        canvas.paste(p, (x, 0))
        x += p.width + GAP
    if footer:
        d = ImageDraw.Draw(canvas)
        d.text((4, H - fh + 2), footer, fill=(0, 0, 0), font=_font(11))
    return canvas


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def chw_to_image(chw: np.ndarray) -> Image.Image:
    """[3,H,W] float in [0,1] -> 8-bit RGB image (for ``--input X.npy``)."""
    a = np.clip(np.asarray(chw, dtype=np.float64), 0.0, 1.0).transpose(1, 2, 0)
    return Image.fromarray(np.rint(a * 255).astype(np.uint8), "RGB")
