"""Datasets: images with captions, loaded from a folder or made in the graph, prepared for training.

A :class:`Dataset` is a plain value (it flows on the canvas as ``FT_DATASET``): its examples hold decoded RGB pictures
and captions, and its options say how the training loop turns them into batches (resolution, buckets, caption
dropout and shuffling, augmentation). Nothing here touches the model; :func:`prepare` makes the tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import is_blank, read_metadata, read_text
from .images import MAX_PIXELS, PictureTooLarge, load_image, load_mask, picture_suffixes
from .names import nfc, scan_folder

log = logging.getLogger(__name__)
@dataclass(frozen=True)
class Augment:
    """On-the-fly kornia augmentation, applied to each batch before encoding."""

    flip: float = 0.5  #: probability of a horizontal flip
    crop_scale: float = 1.0  #: smallest area fraction kept by a random resized crop (1 = no crop)
    color_jitter: float = 0.0  #: strength of brightness/contrast/saturation jitter (hue is a quarter of it)

    def __post_init__(self):
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip probability {self.flip} must be between 0 and 1")
        if not 0.1 <= self.crop_scale <= 1:
            raise ValueError(f"crop_scale {self.crop_scale} must be between 0.1 and 1")
        if not 0 <= self.color_jitter <= 1:
            raise ValueError(f"color_jitter {self.color_jitter} must be between 0 and 1")


@dataclass
class Example:
    image: np.ndarray  #: (H, W, 3) uint8 RGB
    caption: str
    name: str
    #: a paired ControlNet condition (H', W', 3) uint8, resized and cropped with the picture
    condition: np.ndarray | None = field(default=None, repr=False)
    #: where the loss counts (H', W') uint8, 255 = fully (trainers.masks); resized and cropped with the picture
    mask: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Dataset:
    examples: list[Example]
    name: str = "dataset"
    repeats: int = 1
    #: training resolution (the side of a square, or the area of a bucket); 0 = the model's native size
    resolution: int = 0
    bucketing: bool = False
    #: never enlarge a picture smaller than its bucket: use a smaller bucket instead
    no_upscale: bool = False
    caption_dropout: float = 0.0
    shuffle_captions: bool = False
    #: with shuffling, keep the first N comma-separated parts in place (an identifier such as "sks dog")
    keep_tokens: int = 1
    augment: Augment | None = None
    source: str = ""  #: where it came from, for the training log
    #: when set, every step draws one of these captions ("{}" = the token) instead of the example's own
    caption_templates: tuple[str, ...] = ()
    template_token: str = ""
    #: what loading noticed (skipped files, captions without a picture), shown in the loader node
    warnings: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.examples:
            raise ValueError(f"dataset {self.name!r} has no images")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def with_options(self, **kw) -> "Dataset":
        return replace(self, **kw)

    def fingerprint(self) -> str:
        """A hash of pictures, captions and options: the same dataset gives the same hash."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(e.caption.encode()); h.update(str(e.image.shape).encode()); h.update(e.image.tobytes())
            for tag, extra in ((b"condition", e.condition), (b"mask", e.mask)):
                if extra is not None:
                    h.update(tag); h.update(str(extra.shape).encode()); h.update(extra.tobytes())
        h.update(json.dumps(self.options(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def options(self) -> dict:
        return {"repeats": self.repeats, "resolution": self.resolution, "bucketing": self.bucketing,
                "no_upscale": self.no_upscale, "caption_dropout": self.caption_dropout,
                "shuffle_captions": self.shuffle_captions, "keep_tokens": self.keep_tokens,
                "augment": None if self.augment is None else self.augment.__dict__,
                **({"caption_templates": list(self.caption_templates), "template_token": self.template_token}
                   if self.caption_templates else {})}

    def describe(self) -> dict:
        """What a training log and the LoRA metadata record about the data."""
        tags: dict[str, int] = {}
        for e in self.examples:
            for t in (p.strip() for p in e.caption.split(",")):
                if t:
                    tags[t] = tags.get(t, 0) + 1
        return {"name": self.name, "source": self.source, "images": len(self.examples), **self.options(),
                "tag_frequency": tags}


# ---------------------------------------------------------------------------------------------------- loading --
@dataclass
class _Tally:
    """What loading a folder noticed, for the warnings."""

    examples: list[Example] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    uncaptioned: list[str] = field(default_factory=list)
    blank: list[str] = field(default_factory=list)  #: caption files and metadata rows holding only whitespace
    notes: list[str] = field(default_factory=list)  #: guessed caption encodings (read_text logs them)
    frames: list[str] = field(default_factory=list)  #: animations and multi-page files, of which the first frame


def load_folder(folder: str | Path, caption: str = "", token: str = "", repeats: int = 1) -> Dataset:
    """Load every image under ``folder`` (recursively) with its caption.

    Captions, in order of precedence: ``name.txt`` beside ``name.png``; ``metadata.jsonl`` / ``metadata.csv``;
    else ``caption`` with ``{token}`` replaced by ``token``. A caption holding only whitespace counts as none. Names
    match in one Unicode normalisation (NFC). Unreadable files, pictures in formats this Pillow does not read and
    guessed caption encodings are named in warnings; a file that is a symbolic link leading out of the folder is an
    error (a shared workflow must not read elsewhere).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    tally = _Tally()
    meta = read_metadata(folder, tally.notes)
    found = scan_folder(folder)
    real = folder.resolve()
    for p in found.files() + [folder / "metadata.jsonl", folder / "metadata.csv"]:
        if p.exists() and real not in p.resolve().parents:
            raise ValueError(f"dataset folder {folder.name!r}: {p.relative_to(folder).as_posix()} is a link to a file "
                             "outside the folder; copy the file in instead of linking to it")
    unknown = sorted(set(meta) - {rel for _, rel, _ in found.pictures})
    if unknown:
        log.warning("dataset %s: the metadata names %d file(s) that are not in the folder, whose captions are not "
                    "used: %s", folder.name, len(unknown), ", ".join(unknown[:5]))
    _load_pictures(folder, found, meta, caption.replace("{token}", token).strip(), tally)
    _check_loaded(folder, found, tally, caption)
    notes = _folder_notes(folder, found, tally, unknown)
    return Dataset(tally.examples, name=folder.name, repeats=repeats, source=str(folder.name), warnings=tuple(notes))


def _load_pictures(folder: Path, found, meta: dict[str, str], fallback: str, tally: _Tally) -> None:
    for key, rel, p in found.pictures:
        try:
            img, mask = load_image(p, tally.frames), load_mask(p, found.masks.get(key))
        except Exception as e:  # any decoder failure: the file is unusable, the rest of the folder is not
            log.warning("skipping %s: not a readable image (%s)", rel, e)
            tally.skipped.append(rel)
            if isinstance(e, PictureTooLarge):
                tally.reasons[rel] = str(e)
            continue
        cap = _caption_of(folder, key, rel, found, meta, tally)
        if cap is None:
            cap = fallback
            tally.uncaptioned.append(rel)
        if mask is not None and mask.shape != img.shape[:2]:
            raise ValueError(f"dataset folder {folder.name!r}: the mask of {rel} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"the picture {img.shape[1]}x{img.shape[0]}; a mask must have its picture's size")
        tally.examples.append(Example(img, cap, rel, mask=mask))


def _caption_of(folder: Path, key: str, rel: str, found, meta: dict[str, str], tally: _Tally) -> str | None:
    """The caption of picture ``rel``: its ``name.txt``, else its metadata row; None when neither holds any text."""
    side = found.captions.get(key)
    if side is not None:
        text = read_text(side, notes=tally.notes).strip()
        if not is_blank(text):
            return text
        tally.blank.append(nfc(side.relative_to(folder).as_posix()))
    text = meta.get(rel)
    if text is not None:
        if not is_blank(text):
            return text
        tally.blank.append(f"the metadata row of {rel}")
    return None


def _check_loaded(folder: Path, found, tally: _Tally, caption: str) -> None:
    """Refuse a folder with no usable picture, or with pictures without a caption and no caption input."""
    if not tally.examples:
        big = "".join(f"; {k}: {v}" for k, v in list(tally.reasons.items())[:3])
        what = (f"{len(tally.skipped)} unreadable file(s): {', '.join(tally.skipped[:5])}{big}" if tally.skipped
                else "no image files")
        if found.unloaded:
            what += f"; {len(found.unloaded)} picture(s) in a format not read here: {'; '.join(found.unloaded[:3])}"
        raise ValueError(f"dataset folder {folder.name!r} has no usable image ({what}); accepted formats: "
                         f"{', '.join(picture_suffixes())}")
    if tally.uncaptioned and not caption.strip():
        n, first = len(tally.uncaptioned), ", ".join(tally.uncaptioned[:3])
        blank = (f"; {len(tally.blank)} caption(s) hold only whitespace: {', '.join(tally.blank[:3])}"
                 if tally.blank else "")
        raise ValueError(f"{n} image(s) in {folder.name!r} have no caption ({first}{'…' if n > 3 else ''}{blank}): "
                         "add name.txt files or metadata.jsonl, or set the caption input (e.g. 'a photo of {token}')")


def _folder_notes(folder: Path, found, tally: _Tally, unknown: list[str]) -> list[str]:
    """The warnings a loader node shows (each also logged)."""
    keys = {k for k, _, _ in found.pictures} | found.unloaded_keys
    orphans = [nfc(t.relative_to(folder).as_posix()) for k, t in found.captions.items() if k not in keys]
    notes = []
    if orphans:
        log.warning("caption files without an image in %s: %s", folder.name, ", ".join(orphans[:5]))
        notes.append(f"{len(orphans)} caption file(s) without a picture: {', '.join(orphans[:5])}")
    if found.unloaded:
        notes.append(f"{len(found.unloaded)} picture(s) not loaded, in a format not read here: "
                     f"{'; '.join(found.unloaded[:5])}")
        log.warning("dataset %s: %s", folder.name, notes[-1])
    if tally.skipped:
        log.warning("dataset %s: %d image(s) loaded, %d skipped", folder.name, len(tally.examples), len(tally.skipped))
        notes.append(f"{len(tally.skipped)} file(s) skipped, not readable images: {', '.join(tally.skipped[:5])}")
    if unknown:
        notes.append(f"the metadata names {len(unknown)} file(s) not in the folder: {', '.join(unknown[:5])}")
    if tally.blank:
        notes.append(f"{len(tally.blank)} caption(s) hold only whitespace and count as none: "
                     f"{', '.join(tally.blank[:5])}; write the caption in, or delete the file to use the caption input")
        log.warning("dataset %s: %s", folder.name, notes[-1])
    for note in tally.frames:
        log.warning("dataset %s: %s", folder.name, note)
    notes += tally.notes[:10] + tally.frames[:10]  # the log has them all
    if tally.uncaptioned:
        notes.append(f"{len(tally.uncaptioned)} picture(s) without a caption file use the caption input")
    return notes


def from_images(images: np.ndarray, captions: list[str], name: str = "images") -> Dataset:
    """A dataset from a (B, H, W, 3) float 0..1 batch (ComfyUI IMAGE) and one caption, or one per image."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"images must be an IMAGE batch (B, H, W, 3), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if len(captions) == 1:
        captions = captions * n
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images: give one caption, or one per line per image")
    arr = (np.clip(images[..., :3], 0, 1) * 255).round().astype(np.uint8)
    return Dataset([Example(arr[i], captions[i].strip(), f"image {i}") for i in range(n)], name=name, source="graph")


def pair_conditions(dataset: Dataset, conditions: Dataset) -> Dataset:
    """Attach to each picture the condition image with the same file name (ignoring the extension and case).

    A condition of another size is resized and cropped like its picture when batches are prepared.
    """
    def key(name: str) -> str:  # macOS's NFD names match the NFC names typed elsewhere
        return nfc(str(Path(name).with_suffix(""))).lower()

    by_name: dict[str, np.ndarray] = {}
    for c in conditions.examples:
        if key(c.name) in by_name:
            raise ValueError(f"conditions: two images are named {Path(c.name).stem!r}; names must be unique to pair")
        by_name[key(c.name)] = c.image
    lonely = [e.name for e in dataset.examples if key(e.name) not in by_name]
    if lonely:
        raise ValueError(f"conditions: no condition image named like {len(lonely)} training picture(s) "
                         f"({', '.join(lonely[:3])}{'…' if len(lonely) > 3 else ''}); each picture needs a condition "
                         "with the same file name (any image extension) in the conditions folder")
    examples = [replace(e, condition=by_name[key(e.name)]) for e in dataset.examples]
    return replace(dataset, examples=examples, source=f"{dataset.source} + conditions {conditions.name}")


# ------------------------------------------------------------------------------------------ buckets / captions --
def bucket_for(h: int, w: int, resolution: int, multiple: int, no_upscale: bool) -> tuple[int, int]:
    """(height, width): about resolution**2 pixels with the picture's aspect ratio, both multiples of ``multiple``.

    With ``no_upscale`` a picture smaller than that keeps (about) its own size instead of being enlarged.
    """
    area = resolution * resolution
    if no_upscale and h * w < area:
        area = h * w
    aspect = w / h
    bh = math.sqrt(area / aspect)
    bw = bh * aspect
    bh = max(multiple, int(bh // multiple) * multiple)
    bw = max(multiple, int(bw // multiple) * multiple)
    return bh, bw


def cover(ih: int, iw: int, h: int, w: int) -> tuple[int, int, int, int]:
    """The size a (ih, iw) picture is scaled to so that it covers (h, w), and the top-left corner of the centred
    (h, w) crop in it: (nh, nw, top, left). SDXL's time ids carry that corner."""
    if (ih, iw) == (h, w):
        return h, w, 0, 0
    s = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * s)), max(w, round(iw * s))
    return nh, nw, (nh - h) // 2, (nw - w) // 2


def resize_cover(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Scale to cover (h, w), then centre-crop: no stretching."""
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    nh, nw, top, left = cover(ih, iw, h, w)
    im = Image.fromarray(img).resize((nw, nh), Image.LANCZOS if max(h / ih, w / iw) < 1 else Image.BICUBIC)
    return np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8)


def process_caption(caption: str, *, shuffle: bool, keep: int, dropout: float, generator) -> str:
    import torch

    if dropout and float(torch.rand((), generator=generator)) < dropout:
        return ""
    if shuffle and "," in caption:
        parts = [p.strip() for p in caption.split(",")]
        head, tail = parts[:keep], parts[keep:]
        order = torch.randperm(len(tail), generator=generator).tolist()
        caption = ", ".join(head + [tail[i] for i in order])
    return caption


@dataclass
class Prepared:
    """Pictures resized into their buckets, grouped by size: what the loop draws batches from."""

    pixels: dict[tuple[int, int], "object"] = field(default_factory=dict)  # bucket -> (N, 3, h, w) tensor [-1, 1]
    #: paired ControlNet conditions, bucket -> (N, 3, h, w) tensor [0, 1]; empty when the dataset has none
    conditions: dict[tuple[int, int], "object"] = field(default_factory=dict)
    #: loss masks, bucket -> (N, 1, h, w) tensor [0, 1] (1 where a picture has none); empty when no picture has one
    masks: dict[tuple[int, int], "object"] = field(default_factory=dict)
    captions: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    index: list[tuple[tuple[int, int], int]] = field(default_factory=list)  # one entry per (repeated) example
    #: where each picture came from, bucket -> (N, 6): original height and width, crop top and left (in the scaled
    #: picture), target height and width (SDXL is conditioned on it: its time ids)
    framing: dict[tuple[int, int], "object"] = field(default_factory=dict)


def prepare(dataset: Dataset, native_size: int, multiple: int) -> Prepared:
    import torch

    res = dataset.resolution or native_size
    out = Prepared()
    paired = any(e.condition is not None for e in dataset.examples)
    masked = any(e.mask is not None for e in dataset.examples)
    if paired and any(e.condition is None for e in dataset.examples):
        lone = [e.name for e in dataset.examples if e.condition is None]
        raise ValueError(f"{len(lone)} picture(s) have no paired condition ({', '.join(lone[:3])}): every picture "
                         "needs one, or none")
    for e in dataset.examples:
        h, w = e.image.shape[:2]
        if dataset.bucketing:
            bh, bw = bucket_for(h, w, res, multiple, dataset.no_upscale)
        else:
            side = res
            if dataset.no_upscale and min(h, w) < res:
                side = max(multiple, (min(h, w) // multiple) * multiple)
            bh = bw = side
        img = resize_cover(e.image, bh, bw)
        out.framing.setdefault((bh, bw), []).append(torch.tensor([h, w, *cover(h, w, bh, bw)[2:], bh, bw],
                                                                  dtype=torch.float32))
        t = torch.tensor(img).permute(2, 0, 1).float() / 127.5 - 1  # a copy: a picture may be read-only
        out.pixels.setdefault((bh, bw), []).append(t)
        out.captions.setdefault((bh, bw), []).append(e.caption)
        if paired:
            c = resize_cover(e.condition, bh, bw)
            out.conditions.setdefault((bh, bw), []).append(torch.from_numpy(c).permute(2, 0, 1).float() / 255)
        if masked:
            m = np.full((h, w), 255, np.uint8) if e.mask is None else e.mask
            m = resize_cover(np.repeat(m[..., None], 3, axis=2), bh, bw)[..., :1]
            out.masks.setdefault((bh, bw), []).append(torch.from_numpy(m).permute(2, 0, 1).float() / 255)
    for store in (out.pixels, out.conditions, out.masks, out.framing):
        for b in store:
            store[b] = torch.stack(store[b])
    for b, caps in out.captions.items():
        for _ in range(dataset.repeats):
            out.index.extend((b, i) for i in range(len(caps)))
    return out
