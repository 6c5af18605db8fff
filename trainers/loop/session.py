"""One training, start to finish, the same from a node, the shell and torchrun: :func:`run_method` trains a method
on a share of the model in a run folder, and each method's ``train_<method>`` (lora.train_lora,
textual_inversion.train_textual_inversion, dreambooth.train_dreambooth, controlnet_training.train_controlnet) turns
the loop's result into the one result type, :class:`~.run.TrainResult`, handed over: the tuned model, what was
trained, and the log."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from .distributed import SINGLE, Shard
from .optimizers import OPTIMIZERS
from ..adapters.kinds import LR_SCALE
from .training import Callbacks, Method, TrainResult, train
from ..model.model import FTModel
from ..config.recipes import TrainConfig, label_of
from ..runs.run_dir import RunDir

log = logging.getLogger(__name__)


def check_resume(run: RunDir, recipe: TrainConfig, model: FTModel) -> None:
    """A resume must continue the same training: the same method, the same base model and the same shape of
    trained weights. Every difference is named, with what the run had and what was asked."""
    path = run.path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"resume_run {run.name!r} has no config.json: it is not a run this pack can resume")
    legacy = json.loads(path.read_text())
    if "format" not in legacy:  # a run of the pack before recipes: its checkpoints resume as they are
        was = legacy.get("method")
        if was is not None and was != recipe.method:
            raise ValueError(f"resume_run {run.name!r} was {label_of(was)}; resume it with the "
                             f"{label_of(was)} node (this is the {label_of(recipe.method)} node)")
        return
    try:
        from ..config.recipes import read_config

        old, cfg = read_config(path)
    except ValueError as e:
        raise ValueError(f"resume_run {run.name!r}: {e}") from None
    was = cfg.get("model", {})
    if old.method != recipe.method:
        raise ValueError(f"resume_run {run.name!r} was {label_of(old.method)} on "
                         f"{was.get('name', '?')}; resume it with the {label_of(old.method)} node "
                         f"(this is the {label_of(recipe.method)} node)")
    diffs = [f"{name} is {getattr(old, name)!r} in the run, {getattr(recipe, name)!r} here"
             for name in recipe.shape if getattr(old, name) != getattr(recipe, name)]
    if was.get("fingerprint") and was["fingerprint"] != model.fingerprint():
        diffs.append(f"the run trained on {was.get('name', '?')} ({was.get('family', '?')}, weights "
                     f"{was['fingerprint']}), this model is {model.name} ({model.family.name}, weights "
                     f"{model.fingerprint()})")
    if was.get("prediction_type") and was["prediction_type"] != model.prediction_type:
        diffs.append(f"the run trained {was['prediction_type']}, this model predicts {model.prediction_type} "
                     "(Load Base Model's prediction input)")
    if diffs:
        raise ValueError(f"resume_run {run.name!r} cannot continue with other settings: " + "; ".join(diffs)
                         + ". Set them as the run had them, or start a new run (empty resume_run)")


def resolve_auto(recipe: TrainConfig, model: FTModel, extra_config: dict | None,
                 subjects: int = 1) -> tuple[TrainConfig, dict]:
    """The recipe with its auto values resolved, each said in the log and kept in the run's config.json
    (``"chosen"``: each value and why): steps 0 (DreamBooth) becomes the family's steps per subject times
    ``subjects`` (:meth:`.Family.steps`); batch_size 0 (DreamBooth) the family's (:meth:`.Family.batch_size`);
    target_modules "auto" becomes the family's preset for the method
    (:meth:`.Family.target_modules`); learning_rate 0 becomes the family's rate for the method
    (:meth:`.Family.learning_rate`), scaled for the adapter kind (``adapters.kinds.LR_SCALE``: lokr) and the optimizer
    (``Spec.auto_lr``: prodigy, lion); validation_cfg 0 becomes the model's sampling guidance
    (:meth:`.FTModel.guidance`: its family's, Z-Image Turbo's 1). A typed value is kept as it is, and so is a value
    already resolved: a method built from the recipe (LoRA's adapters) resolves it first and hands the ``"chosen"``
    notes on."""
    extra = dict(extra_config or {})
    recipe, notes = model.family.adjust(recipe)
    for name, why in notes.items():
        log.info("%s %s (%s)", name, getattr(recipe, name), why)
        extra["chosen"] = {**extra.get("chosen", {}), name: why}
    if recipe.steps == 0:
        steps, why = model.family.steps(recipe, subjects)
        log.info("steps %d (auto: %s)", steps, why)
        extra["chosen"] = {**extra.get("chosen", {}), "steps": f"auto: {why}"}
        recipe = replace(recipe, steps=steps)
    if recipe.batch_size == 0:
        batch, why = model.family.batch_size(recipe)
        log.info("batch_size %d (auto: %s)", batch, why)
        extra["chosen"] = {**extra.get("chosen", {}), "batch_size": f"auto: {why}"}
        recipe = replace(recipe, batch_size=batch)
    if recipe.validation_cfg == 0:
        cfg, whose = model.guidance(0), (model.name if model.sample_cfg else model.family.label)
        log.info("validation_cfg %g (auto: %s's sampling guidance)", cfg, whose)
        extra["chosen"] = {**extra.get("chosen", {}), "validation_cfg": f"auto: {whose}'s sampling guidance"}
        recipe = replace(recipe, validation_cfg=cfg)
    if getattr(recipe, "target_modules", None) == "auto":
        targets, why = model.family.target_modules(recipe)
        log.info("target_modules %s (auto: %s)", targets, why)
        extra["chosen"] = {**extra.get("chosen", {}), "target_modules": f"auto: {why}"}
        recipe = replace(recipe, target_modules=targets)
    if recipe.learning_rate > 0:
        return recipe, extra
    lr, why = model.family.learning_rate(recipe)
    notes = [why]
    kind = getattr(recipe, "adapter", "lora") if getattr(recipe, "mode", "lora") == "lora" else "lora"
    if kind in LR_SCALE:
        lr *= LR_SCALE[kind][0]
        notes.append(f"x{LR_SCALE[kind][0]:g} for {kind}: {LR_SCALE[kind][1]}")
    if OPTIMIZERS[recipe.optimizer].auto_lr:
        lr, note = OPTIMIZERS[recipe.optimizer].auto_lr(lr)
        notes.append(note)
    lr, why = float(f"{lr:.3g}"), "auto: " + "; ".join(notes)
    log.info("learning_rate %g (%s)", lr, why)
    extra["chosen"] = {**extra.get("chosen", {}), "learning_rate": why}
    return replace(recipe, learning_rate=lr), extra


def run_method(method: Method, recipe: TrainConfig, model: FTModel, dataset, run: RunDir,
               callbacks: Callbacks | None = None, shard: Shard = SINGLE, extra_config: dict | None = None,
               work_on: FTModel | None = None, scorer=None) -> TrainResult:
    """Train ``method`` on a share of ``model`` (never ``model`` itself: ComfyUI caches it; the share's frozen
    weights are ``model``'s own tensors, and what trains is new or copied by the method) in ``run``, resuming when
    the recipe names a run to resume (after :func:`check_resume`)."""
    model.family.check_supported(recipe)
    recipe, extra_config = resolve_auto(recipe, model, extra_config)  # a resume compares what auto resolves to
    if recipe.resume_run.strip():
        check_resume(run, recipe, model)
    return train(work_on if work_on is not None else model.share(), dataset, method, recipe, run, callbacks,
                 resume=bool(recipe.resume_run.strip()), extra_config=extra_config, shard=shard, scorer=scorer)


def result_metadata(res: TrainResult, resolution: int) -> dict:
    return {"finetune_config": res.config, "steps": res.step, "resolution": [resolution, resolution]}


def save_in_run(run: RunDir, stem: str, tensors: dict, metadata: dict[str, str]) -> Path | None:
    """The trained file, also kept in the run folder (``<run>/<stem>.safetensors``), written by rank 0 only."""
    if not run.writes:
        return None
    from ..runs.atomic import fsync_dir
    from ..runs.export import write_safetensors

    path = run.path / f"{stem}.safetensors"
    new = path.with_name(path.name + ".new")
    if new.exists():
        new.unlink()
    write_safetensors(new, tensors, metadata)
    new.replace(path)  # a resumed run replaces its own earlier result, never anything else
    fsync_dir(path.parent)
    return path


def settle(model: FTModel, base: FTModel, method: Method) -> FTModel:
    """After training an offloaded ``base`` (its weights in CPU memory): the parts the method did not change share
    ``base``'s weights again (their copies on the device go), the changed ones move to CPU memory, and the model is
    offloaded like its base. Call it once the method's scaffolding is out (after ``method.result``)."""
    if not base.offload:
        return model
    import gc

    import torch

    from ..model.deltas import share

    changed = method.changed_parts()
    for part in base.parts():
        if part in changed:
            getattr(model, part).to("cpu")
        else:
            setattr(model, part, share(getattr(base, part)))
    model.offload = True
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return model
