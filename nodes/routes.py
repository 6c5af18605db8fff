"""Read-only HTTP routes under ``/finetune/`` for the runs panel (web/runs_panel.js), added to ComfyUI's server.

    GET /finetune/runs                          every run under output/finetune/, newest first (JSON)
    GET /finetune/runs/<run>/resume_workflow    an API-format graph that resumes the run, or why there is none
    GET /finetune/runs/<run>/<file>             one of the run's files (.json .jsonl .txt .png .jpg .jpeg .webp .wav)
    GET /workflow_templates/<pack>/<name>.jpg   an example workflow's thumbnail, for ComfyUI's template browser

The front end asks ComfyUI for a pack's template thumbnails at ``/api/workflow_templates/<pack folder>/<name>.jpg``.
ComfyUI 0.8 serves a pack's example_workflows/ folder as it is; newer ComfyUI serves only the ``.json`` files there,
so the pack serves its own thumbnails at that address (the longer, more specific route: where ComfyUI still serves
the folder, either answer is the same file). Only ``<name>.jpg`` files lying in example_workflows/ go out.

ComfyUI also serves every route under ``/api``. Nothing outside the run folders is ever served: a name is checked
as text (decoded again and again, so ``%2e%2e`` and ``%252e%252e`` are ``..`` too) and then where it really leads
(a link out of the run folder is refused); hidden files and other suffixes are refused. JSON goes out with ``<``,
``>`` and ``&`` escaped, text as text/plain, everything with ``nosniff``: a caption or a config value is never
HTML. The work is done by plain functions (:func:`list_runs`, :func:`run_file`), testable without ComfyUI; this
module imports neither torch nor the trainers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("comfyui_finetune")

#: the files a run's route serves, and their content types (text never goes out as HTML)
TYPES = {".json": "application/json", ".jsonl": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
         ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
         ".wav": "audio/wav"}
CURVE_POINTS = 200
MAX_PATH = 1024
MAX_BYTES = 64 * 2 ** 20
STATES = ("running", "finished", "cancelled", "failed")
SAMPLE = re.compile(r"step-(\d+)-(\d+)\.png")
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Content-Security-Policy": "default-src 'none'; sandbox"}


class Refused(Exception):
    """A request the routes answer with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def runs_root() -> Path:
    from . import host

    return host.output_dir() / "finetune"


# ------------------------------------------------------------------------------------------------------ names --
def _check_text(text: str, what: str, single: bool) -> None:
    shown = repr(text[:60]) + ("..." if len(text) > 60 else "")
    if "\x00" in text:
        raise Refused(400, f"{what} {shown} contains a NUL byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise Refused(400, f"{what} {shown} contains a control character")
    if "\\" in text:
        raise Refused(400, f"{what} {shown} contains a backslash: use '/'")
    if text.startswith("/") or re.match(r"[A-Za-z]:", text):
        raise Refused(400, f"{what} {shown} is an absolute path: give a name inside the run folder")
    parts = text.split("/")
    if single and len(parts) > 1:
        raise Refused(400, f"{what} {shown} must be one folder name")
    for part in parts:
        if part in ("", ".", ".."):
            raise Refused(400, f"{what} {shown} has an empty, '.' or '..' part: it must stay inside the run folder")
        if part.startswith("."):
            raise Refused(400, f"{what} {shown} names a hidden file")
        if ":" in part:
            raise Refused(400, f"{what} {shown} contains ':'")
        if len(part) > 255:
            raise Refused(400, f"{what} has a part of {len(part)} characters (255 at most)")


def check_name(text: Any, what: str, single: bool = False) -> list[str]:
    """The '/'-separated parts of a name from a URL, refused (:class:`Refused`, 400) unless it is a plain relative
    name inside its folder; the name is checked as given and after every further round of %-decoding."""
    if not isinstance(text, str) or not text:
        raise Refused(400, f"{what} is empty")
    if len(text) > MAX_PATH:
        raise Refused(400, f"{what} is {len(text)} characters long ({MAX_PATH} at most)")
    seen = text
    for _ in range(8):
        _check_text(seen, what, single)
        try:
            decoded = unquote(seen, errors="strict") if "%" in seen else seen
        except UnicodeDecodeError:
            raise Refused(400, f"{what} has %-escapes that are not UTF-8") from None
        if decoded == seen:
            break
        seen = decoded
    else:
        raise Refused(400, f"{what} is encoded too many times")
    return text.split("/")


def run_folder(root: Path, run: str) -> Path:
    """The real path of run folder ``run`` directly under ``root``; 404 when there is none (a link leading out of
    ``root`` counts as none)."""
    check_name(run, "run", single=True)
    base = Path(root).resolve()
    try:
        real = (Path(root) / run).resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused(404, f"there is no run {run[:80]!r} under output/finetune") from None
    if real.parent != base or not real.is_dir():
        raise Refused(404, f"there is no run {run[:80]!r} under output/finetune")
    return real


def run_file(root: Path, run: str, rel: str) -> Path:
    """The real path of file ``rel`` of run ``run``: 400 for a name that is not a plain relative name or has
    another suffix than :data:`TYPES`, 404 for a file that is missing or leads outside the run folder."""
    folder = run_folder(root, run)
    parts = check_name(rel, "file")
    if Path(parts[-1]).suffix.lower() not in TYPES:
        raise Refused(400, f"only {', '.join(TYPES)} files of a run are served")
    try:
        real = folder.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused(404, f"run {run!r} has no file {rel[:120]!r}") from None
    if folder not in real.parents or not real.is_file() or real.suffix.lower() not in TYPES:
        raise Refused(404, f"run {run!r} has no file {rel[:120]!r}")
    return real


# ---------------------------------------------------------------------------------------------------- listing --
_cache: dict[str, tuple[tuple[int, int], Any]] = {}


def _cached(path: Path, parse: Callable[[bytes], Any]) -> Any:
    """``parse(bytes)`` of a file, kept while its size and mtime stay the same; None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        value = parse(path.read_bytes())
    except (OSError, ValueError):
        value = None
    if len(_cache) > 2048:
        _cache.clear()
    _cache[str(path)] = (key, value)
    return value


def _json(raw: bytes) -> dict | None:
    value = json.loads(raw.decode("utf-8", "replace"))
    return value if isinstance(value, dict) else None


def _log_rows(raw: bytes) -> list[list]:
    """[step, loss] of every whole row with a finite loss (a torn last line is left out)."""
    rows = []
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            step, loss = int(row["step"]), float(row["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(loss):
            rows.append([step, loss])
    return rows


def curve(rows: list[list], points: int = CURVE_POINTS) -> list[list]:
    """At most ``points`` rows, evenly spread, the first and the last included."""
    if len(rows) <= points:
        return list(rows)
    return [rows[round(i * (len(rows) - 1) / (points - 1))] for i in range(points)]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _number(value: Any, kind=float) -> Any:
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if kind is not float or math.isfinite(out) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:2000]


def run_summary(folder: Path) -> dict | None:
    """One run's entry of :func:`list_runs` (None for a folder that is no run: no config, status or log)."""
    config = _cached(folder / "config.json", _json)
    status = _cached(folder / "status.json", _json)
    rows = _cached(folder / "log.jsonl", _log_rows)
    if config is None and status is None and rows is None:
        return None
    config, status, rows = config or {}, status or {}, rows or []
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    recipe = config.get("recipe") if isinstance(config.get("recipe"), dict) else {}
    state = status.get("status")
    samples = sorted(((int(m[1]), int(m[2]), p.name) for p in (folder / "samples").glob("step-*-*.png")
                      if (m := SAMPLE.fullmatch(p.name)) and not p.is_symlink()), key=lambda s: (s[0], s[1]))
    last_sample = samples[-1][0] if samples else None
    checkpoints = [int(p.name[5:]) for p in (folder / "checkpoints").glob("step-*")
                   if p.name[5:].isdigit() and (p / "manifest.json").is_file()]
    times = [t for t in (_mtime(folder / n) for n in ("config.json", "status.json", "log.jsonl")) if t is not None]
    steps = [s for s in (_number(status.get("step"), int), rows[-1][0] if rows else None) if s is not None]
    return {
        "name": folder.name,
        "method": _text(config.get("method")),
        "model": _text(model.get("name")),
        "model_source": _text(model.get("source")),
        "family": _text(model.get("family")),
        "dataset": _text(dataset.get("name")),
        "images": _number(dataset.get("images"), int),
        "status": state if state in STATES else "unknown",
        "error": _text(status.get("error")),
        "step": max(steps) if steps else 0,
        "total": _number(status.get("total", recipe.get("steps")), int),
        "final_loss": rows[-1][1] if rows else None,
        "started": _number(status.get("started")) or (min(times) if times else _mtime(folder)),
        "updated": max(times) if times else _mtime(folder),
        "curve": curve(rows),
        "sample_step": last_sample,
        "samples": [f"samples/{name}" for step, _, name in samples if step == last_sample],
        # a sound model's validation pictures have their sound beside them (step-<N>-<i>.wav)
        "sounds": [f"samples/{name[:-4]}.wav" for step, _, name in samples if step == last_sample
                   and (folder / "samples" / f"{name[:-4]}.wav").is_file()],
        "last_checkpoint": max(checkpoints) if checkpoints else None,
        "best_step": _number(status.get("best_step"), int),  # keep_best: the checkpoint that is the result
        "best_score": _number(status.get("best_score")),
        "ranking": _text(status.get("ranking")),
        "results": sorted(p.name for p in folder.glob("*.safetensors")),
    }


def list_runs(root: Path) -> list[dict]:
    """Every run folder directly under ``root`` (links leading out of it are left out), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    base = root.resolve()
    out = []
    for p in root.iterdir():
        if p.is_symlink():  # a link to another run would list it twice; one leading out is no run here
            continue
        try:
            check_name(p.name, "run", single=True)
            real = p.resolve(strict=True)
        except (Refused, OSError, RuntimeError):
            continue
        if real.parent == base and real.is_dir():
            entry = run_summary(real)
            if entry is not None:
                out.append(entry)
    return sorted(out, key=lambda r: (-(r["started"] or 0.0), r["name"]))


# ------------------------------------------------------------------------------------------------------- HTTP --
def dumps(obj: Any) -> str:
    """JSON that is never markup: NaN and infinities become null, and ``<``, ``>``, ``&`` are \\u-escaped (they
    only ever occur inside JSON strings, so the text is the same JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(obj), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def file_body(path: Path) -> tuple[bytes, str]:
    """(body, content type) of a run file: JSON re-encoded by :func:`dumps` (as text/plain when it does not
    parse), text as text/plain, pictures as they are."""
    ctype = TYPES[path.suffix.lower()]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise Refused(400, f"{path.name} is larger than {MAX_BYTES // 2 ** 20} MB")
    if ctype == "application/json":
        try:
            return dumps(json.loads(raw.decode("utf-8"))).encode(), "application/json; charset=utf-8"
        except ValueError:
            return raw, TYPES[".txt"]
    return raw, ctype


def add_routes(routes, root_fn: Callable[[], Path] = runs_root) -> None:
    """Add the GET routes to an aiohttp ``RouteTableDef`` (ComfyUI's ``PromptServer.instance.routes``, or a
    test's); ``root_fn`` gives the runs folder at each request."""
    import asyncio

    from aiohttp import web

    def reply(obj: Any, status: int = 200):
        return web.Response(text=dumps(obj), status=status, content_type="application/json", headers=HEADERS)

    async def call(fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except Refused as e:
            return e

    @routes.get("/finetune/runs")
    async def runs(request):
        out = await call(list_runs, root_fn())
        return reply({"error": str(out)}, out.status) if isinstance(out, Refused) else reply({"runs": out})

    @routes.get("/finetune/runs/{run}/resume_workflow")
    async def resume(request):
        from .resume import resume_workflow

        out = await call(lambda: resume_workflow(run_folder(root_fn(), request.match_info["run"])))
        return reply({"error": str(out)}, out.status) if isinstance(out, Refused) else reply(out)

    @routes.get("/finetune/runs/{run}/{path:.*}")
    async def run_file_route(request):
        def read():
            return file_body(run_file(root_fn(), request.match_info["run"], request.match_info["path"]))

        out = await call(read)
        if isinstance(out, Refused):
            return reply({"error": str(out)}, out.status)
        body, ctype = out
        return web.Response(body=body, headers={**HEADERS, "Content-Type": ctype})


#: the pack's example workflows, and the name ComfyUI knows the pack by (its folder in custom_nodes, links kept)
EXAMPLES = Path(__file__).parent.parent / "example_workflows"
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def template_thumbnail(name: str, folder: Path = EXAMPLES) -> Path:
    """The thumbnail of example workflow ``name`` (without ``.jpg``): a plain file in ``folder``, or Refused."""
    if not TEMPLATE_NAME.fullmatch(name) or ".." in name:
        raise Refused(404, "no such template thumbnail")
    path = folder / f"{name}.jpg"
    if path.is_symlink() or not path.is_file():
        raise Refused(404, "no such template thumbnail")
    return path


def add_template_routes(routes, folder: Path = EXAMPLES, pack: str | None = None) -> None:
    """The thumbnails of the example workflows at the address the front end asks ComfyUI for them (ComfyUI adds
    the ``/api`` twin)."""
    from aiohttp import web

    @routes.get(f"/workflow_templates/{pack or folder.parent.name}/{{name}}.jpg")
    async def thumbnail(request):
        try:
            body, ctype = file_body(template_thumbnail(request.match_info["name"], folder))
        except Refused as e:
            return web.Response(text=dumps({"error": str(e)}), status=e.status, content_type="application/json",
                                headers=HEADERS)
        return web.Response(body=body, headers={**HEADERS, "Content-Type": ctype, "Cache-Control": "max-age=3600"})


def register() -> bool:
    """Add the routes to ComfyUI's running server (True), when the pack is loaded by ComfyUI; else do nothing."""
    server = sys.modules.get("server")  # ComfyUI's server.py, imported before the custom nodes load
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "routes") or getattr(instance, "_finetune_routes", False):
        return False
    try:
        add_routes(instance.routes)
        add_template_routes(instance.routes)
    except Exception:  # the nodes must load even if the panel's routes cannot be added
        log.exception("comfyui-finetune: the runs panel's routes could not be added")
        return False
    instance._finetune_routes = True
    return True
