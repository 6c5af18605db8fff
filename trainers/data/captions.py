"""Caption and metadata files in the encodings people's tools write: UTF-8 with or without a byte-order mark,
UTF-16 and UTF-32 with one (Windows Notepad's "Unicode"), UTF-16 without one where its zero bytes tell it, and a
legacy Windows code page (read as Windows-1252, with a warning naming the file). Captions holding only whitespace
count as none. Metadata rows (``metadata.jsonl`` / ``metadata.csv``) are keyed by file name in NFC."""
from __future__ import annotations

import codecs
import csv
import json
import logging
from pathlib import Path

from .names import nfc

log = logging.getLogger(__name__)
#: byte-order marks, longest first (UTF-32 LE's starts with UTF-16 LE's)
BOMS = ((codecs.BOM_UTF32_LE, "UTF-32 LE", "utf-32-le"), (codecs.BOM_UTF32_BE, "UTF-32 BE", "utf-32-be"),
        (codecs.BOM_UTF8, "UTF-8", "utf-8"), (codecs.BOM_UTF16_LE, "UTF-16 LE", "utf-16-le"),
        (codecs.BOM_UTF16_BE, "UTF-16 BE", "utf-16-be"))
#: characters that show nothing: a caption of only these and whitespace is no caption
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def is_blank(text: str) -> bool:
    """Whether a caption holds nothing but whitespace (and invisible characters such as a stray byte-order mark)."""
    return not text.translate(_INVISIBLE).strip()


def _warn(notes: list[str] | None, message: str) -> None:
    log.warning("%s", message)
    if notes is not None:
        notes.append(message)


def _utf16_without_bom(raw: bytes) -> str | None:
    """The codec of UTF-16 text without a byte-order mark, told by its zero bytes (text in Latin letters has one in
    every other byte; UTF-8 text has none), or None."""
    if len(raw) < 2 or len(raw) % 2 or b"\x00" not in raw:
        return None
    even, odd = raw[0::2].count(0), raw[1::2].count(0)
    codec = "utf-16-le" if odd > even else "utf-16-be"
    if max(even, odd) < len(raw) // 4:  # fewer than half the characters have a zero byte: not sure enough
        return None
    try:
        raw.decode(codec)
    except UnicodeDecodeError:
        return None
    return codec


def read_text(path: Path, what: str = "caption", notes: list[str] | None = None) -> str:
    """A caption or metadata file's text, in any of the encodings the module's docstring lists; a guessed
    encoding is a warning naming the file (logged, and added to ``notes`` when given); bytes that are no text are
    an error naming the file and the fix."""
    raw = path.read_bytes()
    for bom, label, codec in BOMS:
        if raw.startswith(bom):
            try:
                return _no_zero(raw[len(bom):].decode(codec), path, what)
            except UnicodeDecodeError as e:
                raise ValueError(f"{what} file {path.name} starts with a {label} byte-order mark but is not {label} "
                                 f"text (byte {e.start + len(bom)}): save it again as UTF-8") from None
    codec = _utf16_without_bom(raw)
    if codec is not None:
        text = _no_zero(raw.decode(codec), path, what)
        _warn(notes, f"{what} file {path.name} has no byte-order mark but its zero bytes say "
                     f"{codec.upper().replace('-LE', ' LE').replace('-BE', ' BE')}: read as such ({text[:40]!r}); "
                     "save it as UTF-8 to be sure")
        return text
    try:
        return _no_zero(raw.decode("utf-8"), path, what)
    except UnicodeDecodeError as e:
        bad = e.start
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path.name} is not text in UTF-8 (byte 0x{raw[bad]:02x} at position {bad}) "
                         "nor in UTF-16 or Windows-1252: save it as UTF-8") from None
    _warn(notes, f"{what} file {path.name} is not UTF-8 (byte 0x{raw[bad]:02x} at position {bad}): read as "
                 f"Windows-1252 ({text[:40]!r}); if that reads wrong (another alphabet), save it as UTF-8")
    return text


def _no_zero(text: str, path: Path, what: str) -> str:
    if "\x00" in text:
        raise ValueError(f"{what} file {path.name} holds zero bytes at position {text.index(chr(0))}: it is not "
                         "plain text (or UTF-16 this loader cannot tell); save it as UTF-8")
    return text


def read_metadata(folder: Path, notes: list[str] | None = None) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` / ``metadata.csv`` (Hugging Face imagefolder: ``file_name`` + ``text``), by
    '/'-separated file name in NFC."""
    caps: dict[str, str] = {}
    jl, cs = folder / "metadata.jsonl", folder / "metadata.csv"
    rows: list[dict] = []
    if jl.is_file():
        for i, line in enumerate(read_text(jl, "metadata", notes).splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{jl.name} line {i} is not valid JSON ({e.msg}); each line must be an "
                                     'object like {"file_name": "a.png", "text": "a caption"}') from None
                if not isinstance(row, dict):
                    raise ValueError(f"{jl.name} line {i} is a {type(row).__name__}, not an object like "
                                     '{"file_name": "a.png", "text": "a caption"}')
                rows.append(row)
        source = jl.name
    elif cs.is_file():
        rows = list(csv.DictReader(read_text(cs, "metadata", notes).splitlines()))
        source = cs.name
    else:
        return caps
    for i, r in enumerate(rows, 1):
        fn = r.get("file_name")
        text = r.get("text", r.get("caption"))
        if not fn or text is None:
            raise ValueError(f"{source} row {i} lacks {'file_name' if not fn else 'text'}: each row needs "
                             "file_name (the picture, relative to the folder) and text (its caption)")
        caps[nfc(Path(str(fn).replace("\\", "/")).as_posix())] = str(text).strip()
    return caps
