"""One training, start to finish, the same from a node, the shell and torchrun: :func:`run_method` trains a method
on a copy of the model in a run folder, and each method's ``train_<method>`` (lora.train_lora,
textual_inversion.train_textual_inversion, dreambooth.train_dreambooth, controlnet_training.train_controlnet) turns
the loop's result into a :class:`Trained`: the tuned model, what was trained, and the log."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distributed import SINGLE, Shard
from .loop import Callbacks, Method, TrainResult, train
from .model import FTModel
from .recipes import TrainConfig
from .runs import RunDir, TrainingLog


@dataclass
class Trained:
    """What a training gives back. When it was cancelled, ``model`` and ``result`` are None (the checkpoint is
    written: resume the run)."""

    model: FTModel | None
    result: Any
    run: TrainResult
    extra: dict = field(default_factory=dict)

    @property
    def cancelled(self) -> bool:
        return self.run.cancelled

    @property
    def log(self) -> TrainingLog:
        return TrainingLog.from_result(self.run)

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir


def run_method(method: Method, recipe: TrainConfig, model: FTModel, dataset, run: RunDir,
               callbacks: Callbacks | None = None, shard: Shard = SINGLE, extra_config: dict | None = None,
               work_on: FTModel | None = None) -> TrainResult:
    """Train ``method`` on a copy of ``model`` (never ``model`` itself: ComfyUI caches it) in ``run``, resuming
    when the recipe names a run to resume."""
    return train(work_on if work_on is not None else model.clone(), dataset, method, recipe, run, callbacks,
                 resume=bool(recipe.resume_run.strip()), extra_config=extra_config, shard=shard)


def result_metadata(res: TrainResult, resolution: int) -> dict:
    return {"finetune_config": res.config, "steps": res.step, "resolution": [resolution, resolution]}


def save_in_run(run: RunDir, stem: str, tensors: dict, metadata: dict[str, str]) -> Path | None:
    """The trained file, also kept in the run folder (``<run>/<stem>.safetensors``), written by rank 0 only."""
    if not run.writes:
        return None
    from .export import write_safetensors

    path = run.path / f"{stem}.safetensors"
    new = path.with_name(path.name + ".new")
    if new.exists():
        new.unlink()
    write_safetensors(new, tensors, metadata)
    new.replace(path)  # a resumed run replaces its own earlier result, never anything else
    return path
