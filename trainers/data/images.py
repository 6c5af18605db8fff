"""Decoding pictures and their masks: any PNG/JPEG/WebP as 8-bit RGB, a picture over the size limit refused from its
header, and the mask of a picture for a masked loss (``name.mask.png`` beside it, or its own alpha channel)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: the largest picture a dataset loads, in pixels (8192 x 8192): a "decompression bomb" is refused by its size,
#: read from the header, before any memory is spent on it
MAX_PIXELS = 8192 * 8192


class PictureTooLarge(ValueError):
    """A picture over :data:`MAX_PIXELS`, refused from its header."""


def load_image(path: Path) -> np.ndarray:
    """Decode any PNG/JPEG/WebP as 8-bit RGB: transparency is composited on white, 16-bit and float images are
    scaled, greyscale and CMYK are converted, and the EXIF orientation is applied."""
    with open_checked(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / peak * 255, 0, 255).astype(np.uint8))
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            peak = 1.0 if arr.max() <= 1.0 else arr.max()
            im = Image.fromarray(np.clip(arr / peak * 255, 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def open_checked(path: Path):
    """Open a picture (only its header is read) and refuse it by its size before anything is decoded."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's own limit (179 MP) came first: read the size to say so
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as big:
                im_size = big.size
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        im = None
    else:
        im_size = im.size
    w, h = im_size
    if w * h > MAX_PIXELS:
        if im is not None:
            im.close()
        raise PictureTooLarge(f"{w}x{h} is {w * h / 1e6:.0f} megapixels, over the limit of {MAX_PIXELS / 1e6:.0f} "
                              "(a decompression bomb, or a picture to downscale first)")
    return im


def is_mask_file(path: Path) -> bool:
    """``name.mask.png`` is the mask of ``name.png``, not a training picture."""
    return path.stem.lower().endswith(".mask")


def load_mask(path: Path) -> np.ndarray | None:
    """The mask of the picture at ``path`` as (H, W) uint8 (255 = trains fully): ``name.mask.<ext>`` beside it
    (greyscale; white trains), else the picture's own alpha channel, else None."""
    for suffix in IMAGE_SUFFIXES:
        for side in (path.with_name(f"{path.stem}.mask{suffix}"), path.with_name(f"{path.stem}.mask{suffix.upper()}")):
            if side.is_file():
                with open_checked(side) as im:
                    return np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=np.uint8).copy()
    with open_checked(path) as im:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            return np.asarray(ImageOps.exif_transpose(im).convert("RGBA"), dtype=np.uint8)[..., 3].copy()
    return None
