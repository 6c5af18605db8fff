"""Is a checkpoint folder whole? Each file of a checkpoint is hashed (sha256) as it is written, and the
folder's ``manifest.json``, written last, records every file's size and digest. :func:`problems` compares the folder
with its manifest and says, file by file, what is wrong: missing, cut short, grown, or other bytes than were
written. Checkpoints of older versions have a manifest without sizes and digests: for them only the files' presence
is checked here, and whether they read is checked where they are read (run_dir.load_checkpoint).

The digest costs one pass of sha256 over the bytes (about 1 GB/s per core with SHA-NI, the speed of writing them
to a disk): state.pt and log.json are hashed as they are written; trainable.safetensors is written by the
safetensors library and hashed from the page cache right after (benchmarks/bench_checkpoint_digest.py measures
it)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .reading import DamagedFile

FORMAT = 2  #: manifests with sizes and sha256 digests; older ones have only "files"
#: what a checkpoint holds: trainable.safetensors, state.pt (weights-only pickle), log.json
FILES = ("trainable.safetensors", "state.pt", "log.json")
CHUNK = 8 << 20


class DamagedCheckpoint(DamagedFile):
    """A checkpoint folder that cannot be trained from; ``problems`` say what is wrong, file by file."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def entry(self) -> dict:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def file_digest(path: Path) -> dict:
    """{"bytes", "sha256"} of a file on disk."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def saved_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """safetensors' own ``save_file`` of ``tensors`` (on the CPU, contiguous), then its entry: the file is hashed
    as it lies in the page cache just written (the format stays the library's; the read-back costs about what
    hashing while writing would)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return file_digest(path)


def write_pickle(path: Path, obj) -> dict:
    """``torch.save(obj)`` into ``path``, hashed as it is written."""
    with open(path, "wb") as raw:
        f = _Hashing(raw)
        torch.save(obj, f)
        return f.entry()


def write_text(path: Path, text: str) -> dict:
    with open(path, "wb") as raw:
        f = _Hashing(raw)
        f.write(text.encode("utf-8"))
        return f.entry()


def manifest(step: int, method: str, entries: dict[str, dict]) -> str:
    """manifest.json's text: what older versions read ("files"), and each file's size and digest."""
    return json.dumps({"step": step, "method": method, "files": list(entries), "format": FORMAT,
                       "checks": entries}, indent=1)


def problems(folder: Path, digests: bool = True) -> list[str]:
    """What is wrong with checkpoint ``folder``, file by file (empty: it is whole, as far as its manifest tells).
    ``digests`` False checks presence and sizes only."""
    path = folder / "manifest.json"
    if not path.is_file():
        return ["it has no manifest.json: it was never finished, or the manifest was removed"]
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
        files = list(man["files"])
        checks = man.get("checks") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"manifest.json cannot be read ({reason(e)})"]
    out = []
    for name in dict.fromkeys([*FILES, *files]):
        p = folder / name
        if not p.is_file():
            out.append(f"{name} is missing")
            continue
        want = checks.get(name)
        if not isinstance(want, dict):
            continue  # a checkpoint of an older version: whether it reads is what tells
        size = p.stat().st_size
        if size != want.get("bytes"):
            how = "cut short" if size < want.get("bytes", 0) else "longer than written"
            out.append(f"{name} is {how}: {size:,} bytes, manifest.json says {want.get('bytes', 0):,}")
        elif digests and file_digest(p)["sha256"] != want.get("sha256"):
            out.append(f"{name} holds other bytes than were written (its sha256 differs from manifest.json's)")
    return out


def reason(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).strip().split("\n")[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
