"""Decoding pictures and their masks: every common picture format this Pillow opens (PNG, JPEG, WebP, BMP, GIF,
TIFF, TGA, PNM, QOI, JPEG 2000, AVIF; HEIC and JPEG XL once their plugins are installed) as 8-bit RGB, a picture over
the size limit refused from its header, the first frame of an animation, and the mask of a picture for a masked loss
(``name.mask.png`` beside it, or its own alpha channel). A format Pillow cannot open here is named with its fix."""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

#: the picture formats a dataset loads (by suffix, lower case) where this Pillow opens them
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".tga", ".apng", ".jpe",
                    ".jfif", ".dib", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".qoi", ".jp2", ".j2k", ".jpx", ".jpf",
                    ".avif", ".heic", ".heif", ".jxl")
_AS_PNG = "or save the pictures as PNG or JPEG"
_HEIF = f"pip install pillow-heif (the pack registers it once installed), {_AS_PNG}"
_J2K = f"a Pillow built with OpenJPEG (pip install -U pillow: the wheels from PyPI have it), {_AS_PNG}"
_RAW = "develop it to PNG or JPEG first"
#: picture formats this Pillow may not open, by suffix: (the format, how to load it)
FIXES = {".heic": ("HEIC", _HEIF), ".heif": ("HEIF", _HEIF),
         ".avif": ("AVIF", f"pip install -U pillow (11.3 and newer read AVIF) or pip install pillow-avif-plugin, "
                           f"{_AS_PNG}"),
         ".jxl": ("JPEG XL", f"pip install pillow-jxl-plugin, {_AS_PNG}"),
         ".webp": ("WebP", f"a Pillow built with WebP (pip install -U pillow), {_AS_PNG}"),
         **{s: ("JPEG 2000", _J2K) for s in (".jp2", ".j2k", ".jpx", ".jpf")},
         ".psd": ("Photoshop", "export it as PNG (layers are not read)"),
         ".svg": ("SVG", "export it as PNG at the size you train at"),
         **{s: ("camera raw", _RAW) for s in (".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")}}
#: formats whose Pillow plugin is there even when the library it needs is not: (feature kind, feature name)
_FEATURES = {"WEBP": ("module", "webp"), "AVIF": ("module", "avif"), "JPEG2000": ("codec", "jpg_2000")}
#: optional plugin packages for formats Pillow lacks: (a suffix they add, module, function that registers it)
_PLUGINS = ((".heic", "pillow_heif", "register_heif_opener"), (".avif", "pillow_avif", ""), (".jxl", "pillow_jxl", ""))
_plugins_tried = False
#: the largest picture a dataset loads, in pixels (8192 x 8192): a "decompression bomb" is refused by its size,
#: read from the header, before any memory is spent on it
MAX_PIXELS = 8192 * 8192


class PictureTooLarge(ValueError):
    """A picture over :data:`MAX_PIXELS`, refused from its header."""


def _opens(fmt: str | None) -> bool:
    """Whether this Pillow opens pictures of format ``fmt`` (its plugin registered, and the library it needs built)."""
    if fmt not in Image.OPEN:
        return False
    kind, name = _FEATURES.get(fmt, ("", ""))
    if not kind:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(features.check_module(name) if kind == "module" else features.check_codec(name))
    except ValueError:  # a Pillow that does not know the feature: the format came from a plugin package
        return True


def _register_plugins() -> None:
    """Register the installed plugin packages for formats this Pillow does not read (HEIC, old Pillows' AVIF, JXL)."""
    global _plugins_tried
    if _plugins_tried:
        return
    _plugins_tried = True
    for suffix, module, register in _PLUGINS:
        if _opens(Image.registered_extensions().get(suffix)):
            continue
        try:
            mod = importlib.import_module(module)
            if register:
                getattr(mod, register)()
        except Exception:  # not installed, or broken: the format is named with its fix where a picture needs it
            continue


def picture_suffixes() -> tuple[str, ...]:
    """The suffixes of :data:`PICTURE_SUFFIXES` this Pillow opens, with the plugins that are installed."""
    _register_plugins()
    known = Image.registered_extensions()
    return tuple(s for s in PICTURE_SUFFIXES if _opens(known.get(s)))


def why_not_loaded(suffix: str, loaded: tuple[str, ...]) -> str | None:
    """Why a file with ``suffix`` (lower case) is not loaded as a picture, with the fix; None for a picture that is
    loaded, or a file that is no picture at all (a caption, a note)."""
    if suffix in loaded:
        return None
    if suffix in FIXES:
        fmt, fix = FIXES[suffix]
        return f"{fmt} is not read here: {fix}"
    if suffix in PICTURE_SUFFIXES:
        return f"this Pillow does not read {suffix}: pip install -U pillow, {_AS_PNG}"
    fmt = Image.registered_extensions().get(suffix)
    return None if fmt is None else f"{fmt} is not a format datasets load: save it as PNG"


def load_image(path: Path, notes: list[str] | None = None) -> np.ndarray:
    """Decode a picture as 8-bit RGB: transparency is composited on white, 16-bit and float images are scaled,
    greyscale, palette and CMYK are converted, and the EXIF orientation is applied. An animation or a multi-page
    file gives its first frame and says so in ``notes``."""
    with open_checked(path) as im:
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and notes is not None:
            notes.append(f"{path.name} has {frames} frames (an animation or a multi-page file): the first is used; "
                         "save the frame you want as PNG to train on another")
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / peak * 255, 0, 255).astype(np.uint8))
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            peak = 1.0 if arr.max() <= 1.0 else arr.max()
            im = Image.fromarray(np.clip(arr / peak * 255, 0, 255).astype(np.uint8))
        if _has_alpha(im):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


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


def load_mask(path: Path, mask_file: Path | None = None) -> np.ndarray | None:
    """The mask of the picture at ``path`` as (H, W) uint8 (255 = trains fully): ``mask_file`` (its
    ``name.mask.<ext>``, greyscale; white trains) where given, else the picture's own alpha channel, else None."""
    if mask_file is not None:
        with open_checked(mask_file) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=np.uint8).copy()
    with open_checked(path) as im:
        if _has_alpha(im):
            return np.asarray(ImageOps.exif_transpose(im).convert("RGBA"), dtype=np.uint8)[..., 3].copy()
    return None
