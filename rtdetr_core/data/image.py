"""Reading images with Pillow and the official validation transform, in numpy.

Official RT-DETR v1 validation pipeline (``rtdetr_pytorch/configs/dataset/coco_detection.yml``):
``Resize(size=[640, 640])`` on the PIL image (aspect NOT kept, bilinear with Pillow's
antialiasing, which is what torchvision's ``Resize`` on a PIL image does), then
``ToImageTensor`` + ``ConvertDtype`` (uint8 → float32 / 255).  No mean/std normalisation.
:func:`val_transform` reproduces it bit for bit: Pillow does the resize, numpy divides the
uint8 values by 255 in float32 (IEEE-rounded, as torch does).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

EXIF_ORIENTATION = 0x0112
EXIF_MODES = ("auto", "apply", "ignore")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB (grayscale replicated, alpha dropped as torchvision's
    ``pil_loader`` does with ``convert("RGB")``; 16/32-bit grayscale scaled to 8 bits)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def read_image(path: str, exif: str = "apply",
               expected_size: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation handled.

    ``exif``: ``"apply"`` rotate/flip by the EXIF orientation tag; ``"ignore"`` keep the
    stored pixels; ``"auto"`` apply it unless ``expected_size`` (w, h from the annotation
    file) matches the stored size but not the rotated one — the annotations then refer to
    the stored pixels (as for the few EXIF-rotated COCO images), so nothing is rotated.
    """
    if exif not in EXIF_MODES:
        raise ValueError(f"exif must be one of {EXIF_MODES}, got {exif!r}")
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if exif != "ignore":
        try:
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block must not make the image unreadable
            orientation = 1
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            rotated = ImageOps.exif_transpose(img)
            keep_raw = (exif == "auto" and expected_size is not None
                        and tuple(expected_size) == img.size and rotated.size != img.size)
            if not keep_raw:
                img = rotated
    return _to_rgb(img)


def resize(img: Image.Image, size_hw: Sequence[int]) -> Image.Image:
    """Resize to ``(H, W)`` without keeping the aspect ratio, bilinear (torchvision-on-PIL)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if img.size == (w, h):
        return img
    return img.resize((w, h), Image.BILINEAR)


def to_chw(img: Image.Image, dtype=np.float32) -> np.ndarray:
    """8-bit RGB PIL image → [3, H, W] array of ``dtype`` in [0, 1] (value / 255)."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {a.shape}")
    dt = np.dtype(dtype)
    out = a.transpose(2, 0, 1).astype(dt) / dt.type(255)
    return np.ascontiguousarray(out, dtype=dt)


def val_transform(img: Image.Image, size_hw: Optional[Sequence[int]], dtype=np.float32) -> np.ndarray:
    """Official validation transform: resize to ``size_hw`` (``None``: keep the size), CHW, /255."""
    if size_hw is not None:
        img = resize(img, size_hw)
    return to_chw(img, dtype)


def image_size_of(path: str) -> Tuple[int, int]:
    """(w, h) of an image file as stored (header only, no decoding)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
