"""What a dataset folder holds, matched by name in one Unicode normalisation (NFC): macOS writes "café.png" with
the accent as a separate character (NFD), an editor or metadata.jsonl types it composed (NFC), and both are the same
name here. A picture finds its caption file (``name.txt``), its mask (``name.mask.png``) and its metadata row by that
name; pictures in a format this Pillow cannot open are listed with their fix instead of being dropped."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .images import is_mask_file, picture_suffixes, why_not_loaded


def nfc(text: str) -> str:
    """``text`` in Unicode normalisation form C (composed): the form names are compared in."""
    return unicodedata.normalize("NFC", text)


@dataclass
class Found:
    """The files of a dataset folder, by their path relative to it without the suffix, in NFC (the "key")."""

    #: (key, relative name in NFC, path) of each picture to load, in order
    pictures: list[tuple[str, str, Path]] = field(default_factory=list)
    captions: dict[str, Path] = field(default_factory=dict)  #: key -> name.txt
    masks: dict[str, Path] = field(default_factory=dict)  #: the picture's key -> name.mask.<ext>
    #: "relative name (why it is not loaded, and the fix)" of each picture in a format not read here
    unloaded: list[str] = field(default_factory=list)
    unloaded_keys: set[str] = field(default_factory=set)

    def files(self) -> list[Path]:
        return [p for _, _, p in self.pictures] + list(self.captions.values()) + list(self.masks.values())


def scan_folder(folder: Path) -> Found:
    """Every picture, caption file and mask under ``folder`` (recursively), by NFC name."""
    loaded = picture_suffixes()
    found = Found()
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = nfc(p.relative_to(folder).as_posix())
        suffix = p.suffix.lower()
        key = rel[:len(rel) - len(p.suffix)] if p.suffix else rel
        if suffix == ".txt":
            found.captions.setdefault(key, p)
        elif suffix in loaded and is_mask_file(p):
            found.masks.setdefault(key[:-len(".mask")], p)
        elif suffix in loaded:
            found.pictures.append((key, rel, p))
        elif (why := why_not_loaded(suffix, loaded)) is not None:
            found.unloaded.append(f"{rel} ({why})")
            found.unloaded_keys.add(key)
    return found


def find_nfc(root: Path, name: str) -> str:
    """``name`` (a '/'-separated path under ``root``) as it is spelled on disk where only its Unicode normalisation
    differs (a folder macOS named in NFD, chosen by its NFC name in a workflow); ``name`` itself when it exists or
    nothing matches."""
    if (root / name).exists():
        return name
    here, parts = root, []
    for part in PurePosixPath(name.replace("\\", "/")).parts:
        nxt = here / part
        if not nxt.exists() and here.is_dir():
            want = nfc(part)
            nxt = next((c for c in sorted(here.iterdir()) if nfc(c.name) == want), nxt)
        parts.append(nxt.name)
        here = nxt
    return "/".join(parts)
