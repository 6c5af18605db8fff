"""The one place that talks to ComfyUI: folders, progress, interruption, server events.

Inside ComfyUI every call goes to ComfyUI's own ``folder_paths``, ``comfy.utils.ProgressBar``,
``comfy.model_management`` and ``server.PromptServer``. Outside it (tests, the headless runner, the CLI) a plain
fallback takes over: folders are ``input/``, ``output/`` and ``models/<kind>/`` under the current directory
unless :func:`set_folders` says otherwise, progress goes to a tqdm bar, and :func:`request_interrupt` stands in for
ComfyUI's Cancel button.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

#: Cancel was pressed: the library's exception (the training loop keeps the step that finished and marks the run
#: cancelled). Inside ComfyUI, ComfyUI's InterruptProcessingException becomes this where the pack's progress bar
#: raises it, and turns back into ComfyUI's at the node's edge (:func:`cancels_for_comfyui`).
from ..trainers.loop.cancel import Interrupted

log = logging.getLogger("comfyui_finetune")

#: Model kinds the pack reads or writes, mapped to ComfyUI's folder_paths keys (and the fallback subfolder).
MODEL_KINDS = ("checkpoints", "diffusers", "loras", "embeddings", "controlnet", "clip_vision", "vae",
               "diffusion_models", "text_encoders")
_executing: contextvars.ContextVar[str | None] = contextvars.ContextVar("ft_executing", default=None)
_fallback = {"input": None, "output": None, "models": None}
_interrupt = threading.Event()


def _comfy() -> Any | None:
    """ComfyUI's folder_paths module when running inside ComfyUI, else None."""
    try:
        import folder_paths  # noqa: F401  (ComfyUI's top-level module)
        import comfy.utils  # noqa: F401
    except ImportError:
        return None
    return folder_paths


def in_comfyui() -> bool:
    return _comfy() is not None


# ---------------------------------------------------------------------------------------------------- folders --
def set_folders(input: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                models: str | os.PathLike | None = None) -> None:
    """Where the fallback looks (the runner's ``--input``, ``--out`` and ``--models`` flags)."""
    for key, val in (("input", input), ("output", output), ("models", models)):
        if val is not None:
            _fallback[key] = Path(val).resolve()


def input_dir() -> Path:
    fp = _comfy()
    return Path(fp.get_input_directory()) if fp else (_fallback["input"] or Path.cwd() / "input")


def output_dir() -> Path:
    fp = _comfy()
    return Path(fp.get_output_directory()) if fp else (_fallback["output"] or Path.cwd() / "output")


def temp_dir() -> Path | None:
    """ComfyUI's temp folder (previews it serves and clears at start), or None outside ComfyUI."""
    fp = _comfy()
    return Path(fp.get_temp_directory()) if fp else None


def model_dirs(kind: str) -> list[Path]:
    """Every folder ComfyUI searches for models of ``kind`` (first = where new files are written)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    fp = _comfy()
    if fp:
        try:
            return [Path(p) for p in fp.get_folder_paths(kind)]
        except KeyError:
            return []
    return [(_fallback["models"] or Path.cwd() / "models") / kind]


#: the longest name a workflow may give (a file system's limits are 255 per part and about 4096 in all)
MAX_NAME = 1024


def safe_relative(name: str, what: str) -> PurePosixPath:
    """Check that a name from a workflow is a relative path with no '..': it must stay inside its folder.
    Windows separators count as separators; NUL bytes and over-long names are refused."""
    text = str(name)
    if "\x00" in text:
        raise ValueError(f"{what} {text[:80]!r} contains a NUL byte: give a plain file or folder name")
    if len(text) > MAX_NAME or any(len(part) > 255 for part in text.replace("\\", "/").split("/")):
        raise ValueError(f"{what} is {len(text)} characters long (a name part may have 255, a path {MAX_NAME}): "
                         "give a shorter name")
    p = PurePosixPath(text.replace("\\", "/"))
    if not text.strip() or p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ValueError(f"{what} {name!r} must be a name relative to its folder, without '..' or an absolute "
                         "path: workflows are shared, and a path must not reach outside ComfyUI's folders")
    return p


def inside(root: Path, name: str, what: str) -> Path:
    """``root / name`` for a name from a workflow, checked where it really leads: a name that passes
    :func:`safe_relative` but resolves outside ``root`` (through a symbolic link) is refused. Used for input/ and
    output/ (datasets, runs); in the model folders links are followed as ComfyUI follows them, since sharing model
    files between tools by links is common, and only safetensors are ever read from them."""
    path = Path(root) / safe_relative(name, what)
    real, base = path.resolve(), Path(root).resolve()
    if real != base and base not in real.parents:
        raise ValueError(f"{what} {name!r} leads outside its folder ({Path(root).name}/) through a symbolic link: "
                         "copy the files into the folder instead of linking to them")
    return path


def save_folder(kind: str, filename: str, what: str = "filename") -> tuple[Path, PurePosixPath]:
    """(the folder new ``kind`` models are written to, the checked relative name without .safetensors) for a
    save node's ``filename`` input."""
    rel = safe_relative(str(filename).strip().removesuffix(".safetensors"), what)
    dirs = model_dirs(kind)
    if not dirs:
        raise FileNotFoundError(f"ComfyUI has no '{kind}' model folder configured (see extra_model_paths.yaml)")
    return dirs[0], rel


def list_models(kind: str, suffixes: tuple[str, ...] = (".safetensors",), folders: bool = False,
                marker: str = "model_index.json") -> list[str]:
    """Names (relative, '/'-separated) of model files of ``kind``, or of sub-folders holding a ``marker`` file
    (diffusers models: model_index.json; transformers models: config.json) when ``folders``.

    Inside ComfyUI the file list comes from ``folder_paths.get_filename_list`` (cached, honours
    extra_model_paths); folders are found in every folder ComfyUI searches for ``kind``.
    """
    fp = _comfy()
    if fp and not folders:
        try:
            return sorted(n for n in fp.get_filename_list(kind) if n.lower().endswith(suffixes))
        except KeyError:
            return []
    names: set[str] = set()
    for root in model_dirs(kind):
        if not root.is_dir():
            continue
        if folders:
            names.update(p.parent.relative_to(root).as_posix() for p in root.rglob(marker) if p.parent != root)
        else:
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*")
                         if p.is_file() and p.name.lower().endswith(suffixes))
    return sorted(names)


def model_path(kind: str, name: str) -> Path:
    """The full path of model ``name`` of ``kind``; raises FileNotFoundError naming where it looked."""
    rel = safe_relative(name, f"{kind} model")
    roots = model_dirs(kind)
    for root in roots:
        p = root / rel
        if p.exists():  # links inside model folders are followed, as ComfyUI follows them (models are shared so)
            return p
    where = ", ".join(str(r) for r in roots) or f"(no '{kind}' folder is configured)"
    raise FileNotFoundError(f"{kind} model {name!r} was not found in {where}; put it there, or pick one from "
                            f"the list (refresh the page after adding files)")


def input_subfolders() -> list[str]:
    root = input_dir()
    if not root.is_dir():
        return []
    real = root.resolve()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and (p.resolve() == real or real in p.resolve().parents))


# ------------------------------------------------------------------------------------------ progress / cancel --
@contextlib.contextmanager
def executing_node(node_id: str | None) -> Iterator[None]:
    """Mark which node runs now (the headless runner sets this; ComfyUI knows it itself)."""
    token = _executing.set(node_id)
    try:
        yield
    finally:
        _executing.reset(token)


def request_interrupt() -> None:
    """Outside ComfyUI: make the running job stop at its next step, as ComfyUI's Cancel does."""
    _interrupt.set()


def interrupted() -> bool:
    """True once Cancel was pressed (does not clear the flag)."""
    if in_comfyui():
        import comfy.model_management as mm

        return bool(mm.processing_interrupted())
    return _interrupt.is_set()


def _comfy_interrupt() -> type[BaseException]:
    """ComfyUI's own exception for Cancel (call inside ComfyUI only)."""
    import comfy.model_management as mm

    return mm.InterruptProcessingException


@contextlib.contextmanager
def cancels_for_comfyui() -> Iterator[None]:
    """Around a node's work: inside ComfyUI, the library's :class:`Interrupted` leaves as ComfyUI's
    InterruptProcessingException, so ComfyUI reports a cancel and not an error. Outside ComfyUI nothing changes."""
    try:
        yield
    except Interrupted as e:
        if not in_comfyui():
            raise
        raise _comfy_interrupt()(str(e)) from e


def raise_if_interrupted(message: str = "cancelled") -> None:
    """Raise ComfyUI's InterruptProcessingException (or :class:`Interrupted`) if Cancel was pressed."""
    if in_comfyui():
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted(message)


class Progress:
    """A progress bar: ComfyUI's (which also checks Cancel on every update) or a tqdm bar."""

    def __init__(self, total: int, desc: str = ""):
        self.total = max(1, int(total))
        self._bar = None
        self._tqdm = None
        if in_comfyui():
            import comfy.utils

            self._bar = comfy.utils.ProgressBar(self.total)
        else:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc or None, leave=False,
                              disable=os.environ.get("FT_NO_PROGRESS") == "1")

    def update(self, value: int, preview: Any | None = None, total: int | None = None) -> None:
        """Set the absolute position (and the total, where it was only known later: steps auto); raises
        :class:`Interrupted` if Cancel was pressed (inside ComfyUI, where ComfyUI's bar raises its own exception,
        that one is translated)."""
        if total and total != self.total:
            self.total = int(total)
            if self._tqdm is not None:
                self._tqdm.total = self.total
        if self._bar is not None:
            try:
                self._bar.update_absolute(value, self.total, preview)
            except _comfy_interrupt() as e:  # the library knows Cancel as its own exception
                raise Interrupted(f"cancelled at {value} of {self.total}") from e
        else:
            self._tqdm.update(value - self._tqdm.n)
            raise_if_interrupted()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send_event(event: str, data: dict) -> None:
    """Push a ``finetune.*`` event to the browser (and API clients on the websocket); a no-op outside ComfyUI."""
    if not event.startswith("finetune."):
        raise ValueError("pack events are namespaced: 'finetune.<name>'")
    payload = dict(data)
    payload.setdefault("node", _executing.get())
    if not in_comfyui():
        log.debug("event %s %s", event, payload)
        return
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI imported without its server (e.g. in-process tests)
        return
    if PromptServer.instance is not None:
        PromptServer.instance.send_sync(event, payload)


# ---------------------------------------------------------------------------------------------------- GPU memory --
def hand_over_gpu(device) -> None:
    """Before training on a GPU inside ComfyUI: ComfyUI's own loaded models (a checkpoint sampled earlier in the
    graph, say) leave the GPU and its cache is emptied, so the training gets the whole card. Outside ComfyUI, or on
    the CPU, nothing happens."""
    if getattr(device, "type", str(device)) != "cuda" or not in_comfyui():
        return
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache(force=True)
    log.info("unloaded ComfyUI's models from the GPU before training")


def give_back_gpu(device) -> None:
    """After training on a GPU: free torch's cached blocks, so ComfyUI's next nodes (a native KSampler) can load."""
    if getattr(device, "type", str(device)) != "cuda":
        return
    import gc

    import torch

    gc.collect()
    if in_comfyui():
        import comfy.model_management as mm

        mm.soft_empty_cache(force=True)
    else:
        torch.cuda.empty_cache()
