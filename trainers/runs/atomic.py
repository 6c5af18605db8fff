"""Files that are either whole or absent: written to a temporary name, flushed and fsynced, renamed into place,
and the folder fsynced after the rename, so neither a crash nor a power cut leaves a complete-looking torn file.
A full disk is an error that names what was being written; what was there before is left as it was."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full(e: BaseException, what: str) -> OSError | None:
    """A clear error for ENOSPC / EDQUOT while writing ``what`` (None for any other error)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OSError(e.errno, f"the disk is full while writing {what}; nothing was replaced: free some space "
                                "(old runs under output/finetune, unused checkpoints) and try again")
    return None


def write_file(path: Path, write: Callable[[Path], None], what: str | None = None) -> Path:
    """``write(tmp)`` writes the content to a temporary file beside ``path``; it is fsynced and renamed over
    ``path`` (replacing it: callers that must never overwrite check first), then the folder is fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e, what or path.name)
        if full is not None:
            raise full from e
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str, what: str | None = None) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def publish_folder(tmp: Path, folder: Path, what: str) -> Path:
    """Make the finished folder ``tmp`` the folder ``folder``: every file in it fsynced, then the rename (an older
    ``folder`` is replaced), then the parent fsynced."""
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(tmp)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.replace(old)
        tmp.replace(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(folder)
    fsync_dir(folder.parent)
    return folder


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(folder: Path) -> list[str]:
    """Remove what a dead writer left in ``folder``: ``.<name>.<pid>.tmp`` files of processes that no longer run,
    and unfinished ``*.tmp`` folders (checkpoints, dataset snapshots). A ``X.old`` folder is the previous ``X`` of a
    replacement that stopped half-way: it is put back when ``X`` is missing, else removed. Returns what was done."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).iterdir():
        name = p.name
        if p.is_file() and name.startswith(".") and name.endswith(".tmp"):
            pid = name[:-4].rsplit(".", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                p.unlink(missing_ok=True)
                removed.append(name)
        elif p.is_dir() and name.endswith(".old") and not p.with_name(name[:-4]).exists():
            p.replace(p.with_name(name[:-4]))
            removed.append(f"{name} (put back as {name[:-4]})")
        elif p.is_dir() and name.endswith((".tmp", ".old")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
    return removed
