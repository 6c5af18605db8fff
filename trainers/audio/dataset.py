"""Training datasets of sound: each window of a clip becomes one spectrogram picture with the clip's caption, so
every trainer the pack has trains on sound unchanged (trainers/data/dataset.py's Dataset of pictures)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data.dataset import Dataset, Example

log = logging.getLogger(__name__)


def _pictures(waveform, sample_rate: int, preset: str, channels: str) -> np.ndarray:
    """uint8 (N, H, W, 3) spectrogram pictures of one clip (C, T)."""
    import torch

    from .spectrogram import to_pictures

    pics, _ = to_pictures(torch.as_tensor(np.asarray(waveform, dtype=np.float32)), int(sample_rate), preset, channels)
    return (pics.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _examples(waveform, sample_rate: int, caption: str, name: str, preset: str, channels: str) -> list[Example]:
    pics = _pictures(waveform, sample_rate, preset, channels)
    if len(pics) == 1:
        return [Example(pics[0], caption, name)]
    return [Example(p, caption, f"{name} #{i + 1}") for i, p in enumerate(pics)]


def from_audio(waveform, sample_rate: int, captions: list[str], preset: str, channels: str = "mono mix",
               name: str = "audio") -> Dataset:
    """A dataset from a ComfyUI AUDIO's waveform (B, C, T) and one caption, or one per clip of the batch; every
    window of every clip is a picture."""
    w = np.asarray(waveform, dtype=np.float32)
    if w.ndim != 3:
        raise ValueError(f"audio: expected a waveform (batch, channels, samples), got shape {tuple(w.shape)}")
    if len(captions) == 1:
        captions = captions * w.shape[0]
    if len(captions) != w.shape[0]:
        raise ValueError(f"captions: {len(captions)} captions for {w.shape[0]} clips; give one caption, or one line "
                         "per clip")
    examples = []
    for i, clip in enumerate(w):
        examples += _examples(clip, sample_rate, captions[i].strip(), f"clip {i + 1}", preset, channels)
    return Dataset(examples, name=name, source="graph")


def load_audio_folder(folder: str | Path, preset: str, caption: str = "", token: str = "",
                      channels: str = "mono mix", repeats: int = 1) -> Dataset:
    """Every sound file under ``folder`` (recursively: trainers.audio.files.SUFFIXES), cut into the preset's
    windows. A clip's caption is ``name.txt`` beside ``name.wav``, else ``caption`` with ``{token}`` replaced.
    Unreadable files are skipped and named in a warning; a folder without one readable sound file is an error that
    says what was looked for."""
    from ..data.captions import is_blank, read_text
    from .files import SUFFIXES, read_audio

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: dataset folder {folder.name!r} does not exist")
    real = folder.resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    fallback = caption.replace("{token}", token).strip()
    examples, skipped, uncaptioned, notes = [], [], [], []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if real not in path.resolve().parents:
            raise ValueError(f"dataset folder {folder.name!r}: {rel} is a link to a file outside the folder; copy "
                             "the file in instead of linking to it")
        txt = path.with_suffix(".txt")
        text = read_text(txt, notes=notes) if txt.is_file() else ""
        if is_blank(text):
            if not fallback:
                uncaptioned.append(rel)
                continue
            text = fallback
        try:
            wave, rate = read_audio(path)
        except ValueError as e:
            skipped.append(f"{rel} ({e})")
            continue
        examples += _examples(wave, rate, text.strip(), rel, preset, channels)
    return _checked(folder, files, examples, skipped, uncaptioned, notes, repeats)


def _checked(folder: Path, files, examples, skipped, uncaptioned, notes, repeats: int) -> Dataset:
    from .files import SUFFIXES

    if uncaptioned:
        raise ValueError(f"{len(uncaptioned)} sound file(s) in {folder.name!r} have no caption "
                         f"({', '.join(uncaptioned[:3])}): add name.txt beside each, or set the caption input")
    if not examples:
        what = (f"{len(skipped)} unreadable file(s): {'; '.join(skipped[:3])}" if skipped else
                f"no file ending in {', '.join(SUFFIXES)}")
        raise ValueError(f"folder: dataset folder {folder.name!r} has no usable sound file ({what})")
    warnings = [f"{len(skipped)} file(s) skipped, not readable sound: {'; '.join(skipped[:5])}"] if skipped else []
    for w in warnings:
        log.warning("dataset %s: %s", folder.name, w)
    return Dataset(examples, name=folder.name, repeats=repeats, source=folder.name,
                   warnings=tuple(warnings + notes[:10]))


def toy_clips(note: str | None, timbre: str | None, rhythm: str | None, count: int, caption: str, seed: int):
    """``count`` clips of the toy sound world (None: a different base note / timbre / any rhythm per clip);
    ``caption`` may hold {note}, {timbre} and {rhythm}."""
    from . import names, world

    rng = np.random.default_rng(seed)
    return world.sample_clips(rng, count, notes=names.BASE_NOTES if note is None else (note,),
                              timbres=names.BASE_TIMBRES if timbre is None else (timbre,),
                              rhythms=names.RHYTHMS if rhythm is None else (rhythm,),
                              exclude=names.HELD_OUT_COMBOS if note is None or timbre is None else (),
                              caption=caption)


def toy_dataset(clips, name: str, source: str) -> Dataset:
    """The toy clips as a dataset of toy-preset pictures (one window each)."""
    from .world import SAMPLE_RATE

    examples = [Example(_pictures(c.wave[None], SAMPLE_RATE, "toy_8k_64mel", "mono mix")[0], c.caption,
                        f"{name}-{i}") for i, c in enumerate(clips)]
    return Dataset(examples, name=name, source=source)
