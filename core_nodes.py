"""ComfyUI's core output nodes, for the headless runner (inside ComfyUI, ComfyUI's own are used): SaveImage and
PreviewImage write PNGs with the workflow in their metadata, SaveAudio and PreviewAudio write 16-bit WAV (ComfyUI's
own write FLAC with PyAV). Files are numbered on from the highest number already there, as ComfyUI numbers them.
Importing this module imports no torch."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def _to_uint8(image: Any) -> Any:
    """One (H, W, C) image, float 0..1 (torch tensor or numpy array), as a uint8 numpy array PIL can save."""
    import numpy as np

    if hasattr(image, "detach"):  # a torch tensor: its own methods, so torch needs no import here
        arr = (image.detach().clamp(0, 1) * 255).round().byte().cpu().numpy()
    else:
        arr = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ValueError(f"an IMAGE must have 1, 3 or 4 channels last; got shape {tuple(arr.shape)}")
    return arr


def _next_counter(folder: Path, name: str) -> int:
    """One more than the highest ``<name>_<n>_...`` file in ``folder`` (1 if none), as ComfyUI numbers saves."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_")
    found = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))] if folder.is_dir() else []
    return max(found, default=0) + 1


def _save_pngs(images: Any, prefix: str, root: Path, kind: str, prompt: Any, extra_pnginfo: Any) -> dict:
    """Save a batch of images as ``<prefix>_<counter:05d>_.png`` under ``root``; ComfyUI's "ui" result."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .nodes import host

    rel = host.safe_relative(prefix, "filename_prefix")
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"IMAGE must be a batch (batch, height, width, channels); got shape "
                         f"{tuple(getattr(images, 'shape', ()))}")
    folder = root / rel.parent
    folder.mkdir(parents=True, exist_ok=True)
    subfolder = "" if str(rel.parent) == "." else rel.parent.as_posix()
    meta = PngInfo()  # like ComfyUI, embed the workflow so the image can be dropped back onto ComfyUI
    if prompt is not None:
        meta.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        meta.add_text(key, json.dumps(value))
    counter, saved = _next_counter(folder, rel.name), []
    for image in images:
        filename = f"{rel.name}_{counter:05d}_.png"
        Image.fromarray(_to_uint8(image)).save(folder / filename, pnginfo=meta, compress_level=4)
        saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"ui": {"images": saved}}


class SaveImage:
    """ComfyUI's core SaveImage node, for the headless runner (inside ComfyUI, ComfyUI's own is used)."""

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to save."}),
            "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": (
                "The prefix for the files to save; it may include a subfolder ('renders/cat'). Files are named "
                "<prefix>_00001_.png, numbered on from the highest number already there.")})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: Any, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict:
        from .nodes import host

        return _save_pngs(images, filename_prefix, host.output_dir(), "output", prompt, extra_pnginfo)


class PreviewImage(SaveImage):
    """ComfyUI's core PreviewImage node, for the headless runner: saves into ``<output>/preview/`` ("temp")."""

    DESCRIPTION = "Saves the input images to the preview folder (<output>/preview/) for a quick look."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to preview."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: Any, filename_prefix: str = "ComfyUI_temp", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict:
        from .nodes import host

        return _save_pngs(images, filename_prefix, host.output_dir() / "preview", "temp", prompt, extra_pnginfo)


def _save_sounds(audio: Any, prefix: str, root: Path, kind: str) -> dict:
    """Save each clip of an AUDIO batch as ``<prefix>_<counter:05d>_.wav`` under ``root``; ComfyUI's "ui" result."""
    from .nodes import host
    from .trainers.audio.files import write_wav

    rel = host.safe_relative(prefix, "filename_prefix")
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio: expected ComfyUI's AUDIO (a dict with 'waveform' and 'sample_rate')")
    folder = root / rel.parent
    folder.mkdir(parents=True, exist_ok=True)
    subfolder = "" if str(rel.parent) == "." else rel.parent.as_posix()
    counter, saved = _next_counter(folder, rel.name), []
    for clip in audio["waveform"]:
        filename = f"{rel.name}_{counter:05d}_.wav"
        write_wav(folder / filename, clip.detach().float().cpu().numpy(), int(audio["sample_rate"]))
        saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"ui": {"audio": saved}}


class SaveAudio:
    """ComfyUI's core SaveAudio node, for the headless runner: one file per clip of the batch, as 16-bit WAV (the
    standard library writes it; ComfyUI's own node writes FLAC with PyAV)."""

    RETURN_TYPES = ()
    FUNCTION = "save_flac"
    OUTPUT_NODE = True
    CATEGORY = "audio"
    SHOWS = ("audio",)  # its player (workflows.py)
    DESCRIPTION = "Saves the input audio to your ComfyUI output directory."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "The sound to save."}),
            "filename_prefix": ("STRING", {"default": "audio/ComfyUI", "tooltip": (
                "The prefix for the files to save; it may include a subfolder.")})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_flac(self, audio: Any, filename_prefix: str = "audio/ComfyUI", prompt: Any = None,
                  extra_pnginfo: Any = None) -> dict:
        from .nodes import host

        return _save_sounds(audio, filename_prefix, host.output_dir(), "output")


class PreviewAudio(SaveAudio):
    """ComfyUI's core PreviewAudio node, for the headless runner: saves into ``<output>/preview/`` ("temp")."""

    DESCRIPTION = "Saves the input audio to the preview folder (<output>/preview/) to listen to."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"audio": ("AUDIO", {"tooltip": "The sound to preview."})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_flac(self, audio: Any, filename_prefix: str = "ComfyUI_temp", prompt: Any = None,
                  extra_pnginfo: Any = None) -> dict:
        from .nodes import host

        return _save_sounds(audio, filename_prefix, host.output_dir() / "preview", "temp")
