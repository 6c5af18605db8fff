"""Run folders and checkpoints: ``<output>/finetune/<run>/`` is all a run leaves behind, and all a resume needs.

    config.json        the whole config (recipes.run_config): method, recipe, model identity, dataset
    dataset/           the training pictures and captions as trained (PNG, lossless), so the shell can repeat it
    log.jsonl          one line per step: step, loss, lr, seconds
    status.json        running / finished / cancelled / failed, with the error
    checkpoints/step-N/  trainable.safetensors + state.pt (optimizer, LR schedule, RNG, data position) + log.json,
                       and manifest.json written last, with each file's size and sha256: a folder without it is
                       incomplete and never resumed; one whose files differ from it is damaged, and a resume
                       takes the newest checkpoint that is whole and reads (:func:`newest_usable`)
    samples/           validation pictures
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .integrity import DamagedCheckpoint

log = logging.getLogger(__name__)


class RunDir:
    """``<output>/finetune/<run>/``. ``writes`` is False on the ranks of a distributed run other than rank 0:
    they read checkpoints but never write. ``warnings`` (what this session skipped or worked around: a damaged
    checkpoint) go into every status.json it writes."""

    def __init__(self, path: Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        """Say ``message`` in the log and in status.json from now on (rank 0 only)."""
        if self.writes:
            log.warning("%s", message)
            self.warnings.append(message)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: Path, name: str) -> "RunDir":
        root.mkdir(parents=True, exist_ok=True)
        for i in range(10_000):
            p = root / (name if i == 0 else f"{name}-{i}")
            try:
                p.mkdir()
                return cls(p)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not find a free run name for {name!r} under {root}")

    def write_json(self, name: str, obj) -> None:
        if not self.writes:
            return
        from .atomic import write_text

        write_text(self.path / name, json.dumps(obj, indent=1, default=str), f"{self.name}/{name}")

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def status(self, state: str, **extra) -> None:
        """Write status.json; ``started`` (when the run first began) is kept across resumes."""
        if not self.writes:
            return
        try:
            started = float(self.read_json("status.json")["started"])
        except (OSError, ValueError, KeyError, TypeError):
            started = time.time()
        notes = {"warnings": list(self.warnings)} if self.warnings else {}
        self.write_json("status.json", {"status": state, "time": time.time(), "started": started, **extra, **notes})

    def append_log(self, rows: list[dict]) -> None:
        if not self.writes or not rows:
            return
        with (self.path / "log.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def log_writer(self, history: list[dict], total: int) -> LogWriter:
        return LogWriter(self, history, total)

    def checkpoint_folders(self) -> list[tuple[int, Path]]:
        """Every ``checkpoints/step-N`` folder, finished or not, oldest first."""
        root = self.path / "checkpoints"
        return sorted((int(p.name[5:]), p) for p in (root.glob("step-*") if root.is_dir() else [])
                      if p.name[5:].isdigit() and p.is_dir())

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (their manifest was written last), oldest first; whether their files are whole is
        checked when they are read (:func:`load_checkpoint`)."""
        return [(step, p) for step, p in self.checkpoint_folders() if (p / "manifest.json").is_file()]


class LogWriter:
    """log.jsonl while the run goes: each row waits in memory until the next one arrives at least ``EVERY`` seconds
    after the last write (a row may still gain scores during its own step), then the waiting rows are appended and
    status.json says how far the run is; :meth:`flush` writes the rest at checkpoints and at the end. So a running
    run's curve is on disk, and a killed run keeps all but its last few seconds. ``history`` is what the run's log
    holds already (a resumed checkpoint's rows): the file is cut back to exactly those, since a killed or failed run
    may have logged steps past its last checkpoint, and a resume logs them again."""

    EVERY = 5.0  #: seconds between appends while the run goes

    def __init__(self, run: RunDir, history: list[dict], total: int):
        self.run, self.total, self.rows, self.last = run, total, [], time.monotonic()
        path = run.path / "log.jsonl"
        if run.writes and (history or path.exists()):
            from .atomic import write_text

            write_text(path, "".join(json.dumps(r) + "\n" for r in history), f"{run.name}/log.jsonl")

    def append(self, row: dict) -> None:
        if self.rows and time.monotonic() - self.last >= self.EVERY:
            self.flush()
            self.run.status("running", step=self.run_step, total=self.total)
        self.rows.append(row)

    def flush(self) -> None:
        """Append every waiting row now."""
        self.last = time.monotonic()
        if self.rows:
            self.run.append_log(self.rows)
            self.run_step, self.rows = self.rows[-1]["step"], []


def open_run(root: Path, run_name: str, resume_run: str = "", default: str = "run") -> RunDir:
    """The run folder to train in: the existing ``resume_run`` (an error listing the runs there when it is not one),
    or a new folder named ``run_name`` (a counter is added when it exists). Names must already be checked as
    relative names by the caller (``host.safe_relative``)."""
    if resume_run.strip():
        folder = root / resume_run.strip()
        if not folder.is_dir():
            runs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"resume_run {resume_run!r} is not a run folder under output/finetune "
                                    f"(runs there: {', '.join(runs[-8:]) or 'none'})")
        return RunDir(folder)
    return RunDir.create(root, run_name.strip() or default)


def save_checkpoint(run: RunDir, step: int, method_name: str, trainable: dict[str, torch.Tensor], state: dict,
                    log_rows: list[dict]) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically: a temporary folder, each file hashed as it is written, the
    manifest (sizes and digests) last, then a rename."""
    from . import integrity
    from .atomic import disk_full, publish_folder

    folder = run.path / "checkpoints" / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        entries = {"trainable.safetensors": integrity.saved_safetensors(
            tmp / "trainable.safetensors", {k: v.detach().contiguous().cpu() for k, v in trainable.items()}),
            "state.pt": integrity.write_pickle(tmp / "state.pt", state),
            "log.json": integrity.write_text(tmp / "log.json", json.dumps(log_rows))}
        (tmp / "manifest.json").write_text(integrity.manifest(step, method_name, entries))
        return publish_folder(tmp, folder, f"checkpoint step-{step}")  # manifest last, fsynced, then renamed
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, f"checkpoint step-{step} of run {run.name} (the earlier checkpoints are intact)")
        if full is not None:
            raise full from e
        raise


#: what state.pt must hold for a resume (LoopState.save writes them)
STATE_KEYS = ("optimizer", "lr_scheduler", "rng", "data")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, list[dict]]:
    """(trainable tensors, state, log rows) of a whole checkpoint; only safetensors and weights-only pickles. A
    folder that does not match its manifest, or whose files do not read, is a :class:`DamagedCheckpoint` saying
    which file and what is wrong; nothing of it is used."""
    from safetensors.torch import load_file

    from .integrity import problems, reason

    found = problems(folder)
    if found:
        raise DamagedCheckpoint(f"{folder.name}: " + "; ".join(found), found)

    def read(name: str, how):
        try:
            return how(folder / name)
        except MemoryError:
            raise
        except Exception as e:  # the libraries' errors for a damaged file are of many types
            raise DamagedCheckpoint(f"{folder.name}: {name} cannot be read ({reason(e)})",
                                    [f"{name} cannot be read ({reason(e)})"]) from e

    trainable = read("trainable.safetensors", lambda p: load_file(str(p)))
    # on the CPU: a GPU run's optimizer and EMA state would come back on the GPU it was saved from (every rank of a
    # multi-GPU run onto GPU 0; no GPU at all: an error); loading them moves each tensor to its weight's device
    state = read("state.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
    rows = read("log.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    lacks = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if lacks or not isinstance(rows, list):
        what = f"state.pt lacks {', '.join(lacks)}" if lacks else "log.json is not a list of steps"
        raise DamagedCheckpoint(f"{folder.name}: {what}", [what])
    return trainable, state, rows


def newest_usable(run: RunDir) -> tuple[int, Path, tuple, list[str]]:
    """(step, folder, what :func:`load_checkpoint` read, the newer checkpoints skipped and why) of the newest
    checkpoint of ``run`` that is whole and reads. None: a FileNotFoundError when the run has no checkpoint, else a
    :class:`DamagedCheckpoint` naming the run folder, what is wrong with each checkpoint and the fix."""
    skipped: list[str] = []
    for step, folder in reversed(run.checkpoint_folders()):
        try:
            return step, folder, load_checkpoint(folder), skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    if not skipped:
        raise FileNotFoundError(f"nothing to resume in run {run.name}: it has no complete checkpoint")
    raise DamagedCheckpoint(
        f"resume_run {run.name!r} cannot resume: no checkpoint in {run.path / 'checkpoints'} is usable ("
        + "; ".join(skipped) + "). Nothing was trained from them. Start a new run (empty resume_run; in the shell, "
        "leave out --resume), or put back an intact copy of a checkpoint folder; the damaged folders can be deleted",
        skipped)


@dataclass
class TrainingLog:
    """``FT_TRAINING_LOG``: loss per step, learning rate, timings and the full config of a run."""

    rows: list[dict]
    config: dict
    run: str
    steps: int
    seconds: float
    resumed_from: int | None = None
    best_step: int | None = None  #: keep_best: the step whose checkpoint became the result

    @classmethod
    def from_result(cls, r) -> "TrainingLog":
        return cls(list(r.log), r.config, r.run_dir.name, r.step, round(r.seconds, 2), r.resumed_from,
                   getattr(r, "best_step", None))

    def losses(self) -> list[float]:
        return [row["loss"] for row in self.rows]

    def __repr__(self) -> str:
        return f"TrainingLog(run {self.run!r}, {self.steps} steps)"


# ------------------------------------------------------------------------------------------ dataset snapshot --
def save_dataset(folder: Path, dataset, extra_sets: dict | None = None) -> dict:
    """Write the pictures (and paired conditions) a run trains on as lossless PNGs with their captions and the
    dataset's options, so ``read_dataset`` gives back exactly the same dataset. ``extra_sets`` (name -> list of
    (uint8 picture, caption)) are written beside it (DreamBooth's class pictures). Returns what config.json
    records."""
    from PIL import Image

    from .atomic import publish_folder

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def write(sub: str, items) -> list[dict]:
        (tmp / sub).mkdir()
        rows = []
        for i, (img, caption, name, cond, mask) in enumerate(items):
            row = {"file": f"{sub}/{i:05d}.png", "caption": caption, "name": name}
            Image.fromarray(img).save(tmp / row["file"], compress_level=1)
            for kind, extra in (("condition", cond), ("mask", mask)):
                if extra is not None:
                    row[kind] = f"{sub}/{i:05d}.{kind}.png"
                    Image.fromarray(extra).save(tmp / row[kind], compress_level=1)
            rows.append(row)
        return rows

    index = {"name": dataset.name, "source": dataset.source, "options": dataset.options(),
             "examples": write("images", [(e.image, e.caption, e.name, e.condition, e.mask)
                                          for e in dataset.examples])}
    for key, items in (extra_sets or {}).items():
        index[key] = write(key, [(img, cap, f"{key} {i}", None, None) for i, (img, cap) in enumerate(items)])
    (tmp / "dataset.json").write_text(json.dumps(index, indent=1))
    publish_folder(tmp, folder, f"the dataset snapshot of {folder.parent.name}")
    return {"snapshot": folder.name, "images": len(dataset.examples), "fingerprint": dataset.fingerprint()}


def read_dataset(folder: Path):
    """The dataset :func:`save_dataset` wrote, and its extra sets (name -> list of (picture, caption))."""
    import numpy as np
    from PIL import Image

    from ..data.dataset import Augment, Dataset, Example

    index_path = folder / "dataset.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no dataset.json: the run folder lacks its dataset snapshot")
    index = json.loads(index_path.read_text())

    def pic(rel: str):
        with Image.open(folder / rel) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def grey(rel: str):
        with Image.open(folder / rel) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()

    examples = [Example(pic(r["file"]), r["caption"], r["name"], pic(r["condition"]) if "condition" in r else None,
                        grey(r["mask"]) if "mask" in r else None) for r in index["examples"]]
    opts = dict(index["options"])
    aug = opts.pop("augment", None)
    templates = tuple(opts.pop("caption_templates", ()))
    token = opts.pop("template_token", "")
    ds = Dataset(examples, name=index["name"], source=index["source"], augment=Augment(**aug) if aug else None,
                 caption_templates=templates, template_token=token, **opts)
    extra = {k: [(pic(r["file"]), r["caption"]) for r in v] for k, v in index.items()
             if k not in ("name", "source", "options", "examples")}
    return ds, extra
