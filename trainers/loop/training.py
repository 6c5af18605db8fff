"""The training loop every method shares (LoRA, Textual Inversion, DreamBooth, ControlNet).

One explicit function, :func:`train`, stage by stage: draw a batch, encode it (cached when the encoders are
frozen), add noise at random timesteps, predict, weight the loss, step the optimizer. A *method* object says what
trains (see :class:`Method`); *callbacks* report progress and ask whether to stop. Every random choice comes from
one ``torch.Generator`` whose state is checkpointed with the weights, the optimizer, the LR schedule and the
position in the data, so a resumed run continues bit-for-bit where it stopped (on the CPU).

Under ``torchrun`` the same loop runs on every rank (:mod:`.distributed`): the generator draws each global batch on
every rank alike, each rank trains its slice, DistributedDataParallel averages the gradients, and rank 0 alone
writes the run folder.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..objectives.base import Objective, diffusion_loss
from . import optimizers, validation
from ..data import masks
from .batches import Batches, Encoder
from ..data.dataset import Dataset, prepare
from .ema import EMA, swapped_in
from .validation import BestKeeper
from .distributed import SINGLE, Shard
from ..model.model import FTModel
from .precision import (autocast_for, enable_checkpointing, gpu_options, memory_advice, place_for_training,
                        place_unet, release_frozen)
from ..config.recipes import TrainConfig, run_config
from ..runs.run_dir import RunDir, save_dataset
from .state import LoopState

log = logging.getLogger(__name__)

LOSSES = ("mse", "huber")
PRECISIONS = ("auto", "no", "fp16", "bf16")


class Method:
    """What a training method trains: LoRA, Textual Inversion, DreamBooth (LoRA / full / pivotal), ControlNet.

    The loop calls, in this order:

    1. :meth:`encode_extra` once, then :meth:`setup` once, on the model it trains (a copy: the method may change
       it), under a seeded RNG;
    2. :meth:`param_groups` once, for the optimizer; :meth:`train_modules` says which modules go to train mode;
    3. every micro-batch :meth:`loss` (which calls :meth:`predict`), every optimizer step :meth:`after_step`;
    4. :meth:`trainable_state` at each checkpoint and :meth:`load_trainable_state` on resume;
       :meth:`sample_kwargs` when it makes validation pictures;
    5. after the loop, the caller ends with :meth:`result`: the one verb that hands over what was trained.
    """

    name = "method"
    #: True when the text encoder changes during training (then text embeddings are not cached)
    trains_text_encoder = False

    def encode_extra(self, model: FTModel) -> None:
        """Encode the pictures the method trains on beside the dataset (DreamBooth's class pictures). It runs while
        an offloaded model's VAE is on the device and its UNet not yet, so that the two never meet there."""

    def setup(self, model: FTModel) -> None:
        """Attach the trainable parts to ``model`` (a copy the method may change)."""
        raise NotImplementedError

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        """Optimizer parameter groups (``params``, ``lr``, optionally ``name`` and ``weight_decay``)."""
        raise NotImplementedError

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that trains, as tensors a checkpoint stores."""
        raise NotImplementedError

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put :meth:`trainable_state`'s tensors back (resume)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step (Textual Inversion restores the frozen embedding rows here)."""

    def changed_parts(self) -> tuple[str, ...]:
        """The model's parts whose own weights the training changes (a full fine-tune's UNet, Textual Inversion's
        embedding table); the others end as they began, and an offloaded model's share them with the input again."""
        return ()

    def train_modules(self, model: FTModel) -> list[torch.nn.Module]:
        """Modules to put in train mode (default: those holding trainable parameters)."""
        return [model.denoiser, *model.text_encoders] if self.trains_text_encoder else [model.denoiser]

    def predict(self, model: FTModel, noisy, t, context, batch: dict):
        """The model's prediction for ``noisy`` at ``t`` (a ControlNet adds its residuals here)."""
        return model.denoise(noisy, t, context, batch.get("framing"))

    def sample_kwargs(self) -> dict:
        """Extra arguments of validation sampling (a ControlNet passes its condition)."""
        return {}

    def loss(self, model: FTModel, latents, context, objective: Objective, g, cfg: TrainConfig, batch: dict):
        """The denoising loss of one batch; methods with extra terms (prior preservation, ControlNet) override.
        ``batch["shard"]`` is this process's part of a distributed run: draw through it; ``batch["encode_text"]``
        embeds more captions the way the loop does (cached while the text encoder is frozen)."""
        noisy, t, target = self.noised(latents, objective, g, cfg, batch)
        pred = self.predict(model, noisy, t, context, batch)
        return self.loss_of(pred, target, t, objective, cfg, batch)

    def noised(self, latents, objective: Objective, g, cfg: TrainConfig, batch: dict):
        """(noisy latents, timesteps, target) of one batch: its noise and timesteps drawn from ``g`` by the model's
        objective."""
        return objective.noised(latents, g, cfg.noise_offset, shard=batch.get("shard"))

    def loss_of(self, pred, target, t, objective: Objective, cfg: TrainConfig, batch: dict):
        """The loss of a prediction: the objective's weights per timestep (min-SNR), and the batch's masks where it
        has them."""
        w = objective.weights(t, cfg)
        mask = batch.get("masks")
        px_w = None if mask is None else masks.latent_weights(mask.to(pred.device), pred.shape[-2:],
                                                                cfg.unmasked_weight)
        return diffusion_loss(pred, target, weights=w, loss_type=cfg.loss, huber_delta=cfg.huber_delta,
                              pixel_weights=px_w)

    def extra_sets(self) -> dict[str, list]:
        """Pictures the method trains on beside the dataset (name -> list of (uint8 picture, caption)); they are
        kept in the run's dataset snapshot (DreamBooth's class pictures)."""
        return {}

    def result(self, name: str, metadata: dict) -> Any:
        """After training: take the method's training scaffolding out of the model and return what was trained
        (a LoRA, an embedding, a ControlNet; None for a full fine-tune, whose weights are the model's)."""
        raise NotImplementedError


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    seconds: float


@dataclass
class Callbacks:
    on_step: Callable[[StepInfo], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    on_preview: Callable[[int, torch.Tensor], None] | None = None
    #: keep_best: (step, its scores, the best step so far) after each save point is scored
    on_score: Callable[[int, dict, int], None] | None = None


@dataclass
class TrainResult:
    model: FTModel
    method: Method
    log: list[dict]
    config: dict
    run_dir: Path
    step: int
    cancelled: bool
    seconds: float
    resumed_from: int | None = None
    best_step: int | None = None  #: keep_best: the step whose checkpoint is the result


# ------------------------------------------------------------------------------------------------------ loop --
class _Trainable(torch.nn.Module):
    """Every module whose weights may train, under one module for DistributedDataParallel: its forward runs the
    loss closure it is given, so DDP sees the forward and all-reduces the gradients of the backward."""

    def __init__(self, modules: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


def _prepare_method(model: FTModel, method: Method, cfg: TrainConfig) -> tuple[list[dict], list]:
    for m in model.parts().values():
        m.requires_grad_(False)
        m.eval()
    with torch.random.fork_rng(devices=[]):  # adapters initialise from the global RNG: seed it, then restore it
        torch.manual_seed(cfg.seed)
        method.setup(model)
    groups = method.param_groups(cfg)
    params = [p for grp in groups for p in grp["params"]]
    if not params:
        raise ValueError(f"{method.name}: nothing to train")
    for p in params:  # trainable weights in fp32 even when the frozen model is fp16/bf16
        p.data = p.data.float()
    for m in method.train_modules(model):
        m.train()
    gpu_options(model, cfg)
    enable_checkpointing(model, method, cfg)
    return groups, params


def train(model: FTModel, dataset: Dataset, method: Method, cfg: TrainConfig, run: RunDir,
          callbacks: Callbacks | None = None, resume: bool = False, extra_config: dict | None = None,
          shard: Shard = SINGLE, scorer=None) -> TrainResult:
    """Train ``method`` on ``model`` (changed in place: pass ``base.share()``, whose frozen weights stay the base's)
    and return the result.

    ``resume`` continues from the newest complete checkpoint in ``run``. When ``callbacks.should_stop`` turns true
    (on rank 0) the loop writes a checkpoint at the current step and returns with ``cancelled=True``. ``cfg.batch_size``
    is per process: the global batch of a distributed run is ``batch_size × shard.world``.
    """
    from . import distributed

    cb = callbacks or Callbacks()
    t_start = time.time()
    global_batch = cfg.batch_size * shard.world
    if len(dataset) < global_batch:
        raise ValueError(f"batch_size {global_batch} is larger than the dataset ({len(dataset)} pictures with "
                         f"repeats): lower batch_size or raise the dataset's repeats")
    validation.check(cfg, scorer)
    identity = model.identity()  # the base model as given, before the method adds anything
    g = torch.Generator().manual_seed(cfg.seed)
    # An offloaded model's parts visit the device for the run: the VAE and the text encoders first; the UNet once the
    # latents are cached, so that the VAE's encoding (2.5 GB at 1024 px) never meets the UNet's weights on the GPU.
    home = place_for_training(model)
    mult = model.size_step
    prepared = prepare(dataset, model.native_size, mult)
    batches = Batches(prepared, global_batch, g)
    enc = Encoder(model, dataset, method, prepared, g, shard)
    method.encode_extra(model)
    place_unet(model, home)
    groups, params = _prepare_method(model, method, cfg)
    opt, sched = optimizers.make(groups, cfg)
    ema = EMA(params, cfg.ema_decay, cfg.ema_start, cfg.ema_every) if cfg.ema_decay else None
    autocast, scaler = autocast_for(model, cfg)
    objective = model.objective()
    ddp = None
    if shard.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        tes = model.text_encoders if method.trains_text_encoder else []  # frozen ones may leave the device
        trainable = _Trainable([model.denoiser, *tes, *method.train_modules(model)])
        # SDXL reads its first encoder's penultimate layer: the last one trains nothing, which DDP must be told
        ddp = DistributedDataParallel(trainable, broadcast_buffers=False, find_unused_parameters=len(tes) > 1,
                                      device_ids=[model.device.index] if model.device.type == "cuda" else None)

    left = release_frozen(model, enc, method, dataset, home)
    if left:
        log.info("%s left %s once their outputs were cached", " and ".join(left), model.device)

    if run.writes:  # what a killed run left half-written: unfinished checkpoints and temporary files
        from ..runs.atomic import clean_stale

        for folder in (run.path, run.path / "checkpoints"):
            for name in clean_stale(folder):
                log.info("removed %s/%s, left unfinished by an earlier process", folder.name, name)
    distributed.barrier(shard)  # every rank lists the checkpoints after rank 0 has tidied them
    step, log_rows, resumed_from = 0, [], None
    state = LoopState(method, opt, sched, scaler, g, batches, ema)
    if resume:
        ckpts = run.checkpoints()
        if not ckpts:
            raise FileNotFoundError(f"nothing to resume in run {run.path.name}: it has no complete checkpoint")
        step, folder = ckpts[-1]
        log_rows = state.load(folder, run.path.name)
        resumed_from = step
        log.info("resumed %s from step %d", run.path.name, step)
    optimizers.for_training(opt)  # schedule-free: the weights at their training values (checkpoints hold those)
    snapshot = {}
    if run.writes and not (run.path / "dataset" / "dataset.json").is_file():
        snapshot = save_dataset(run.path / "dataset", dataset, method.extra_sets())
    elif (run.path / "config.json").is_file():
        snapshot = run.read_json("config.json").get("dataset", {}).get("snapshot_info", {})
    full_config = run_config(cfg, identity, {**dataset.describe(), "snapshot_info": snapshot},
                             world_size=shard.world, **(extra_config or {}))
    run.write_json("config.json", full_config)
    run.status("running", step=step, total=cfg.steps)

    def checkpoint(at: int) -> Path | None:
        if not run.writes:
            return None
        folder = state.save(run, at, log_rows)
        if cb.on_checkpoint:
            cb.on_checkpoint(at, folder)
        return folder

    keeper = BestKeeper.create(cfg, scorer, dataset)
    if keeper is not None and resume:
        keeper.replay(log_rows)

    def see(at: int, row: dict, show: bool, score: bool) -> bool:
        """Validation pictures of step ``at`` (shown when asked, scored for keep_best into ``row``); True when the
        score says stop."""
        if not shard.main or not (show or score):
            return False
        contexts = [autocast, optimizers.averaged(opt, params), swapped_in(ema)]  # the weights the result would be
        imgs = validation.pictures(model, method, cfg, run, at, contexts, dataset.resolution)
        if show and cb.on_preview:
            cb.on_preview(at, imgs)
        if not score:
            return False
        scores = keeper.score(imgs, cfg.validation_prompt)
        row.update(scores)
        stop = keeper.record(at, scores)
        if cb.on_score:
            cb.on_score(at, scores, keeper.best_step)
        return stop

    def restore(at: int) -> None:
        state.load(dict(run.checkpoints())[at], run.path.name)
        log.info("the result is step %d's checkpoint (best %s %.4f)", at, keeper.ranking, keeper.best_value)

    cancelled = stopped_early = False
    pending = run.log_writer(log_rows, cfg.steps)  # log.jsonl every few seconds, cut back on resume
    at_boundary = True  # the state is consistent (between steps): a checkpoint taken now resumes exactly
    try:
        while step < cfg.steps:
            stop = cb.should_stop is not None and cb.should_stop()
            if distributed.agree(stop, shard):
                cancelled = True
                break
            at_boundary = False
            t0 = time.time()
            total = 0.0
            for micro in range(cfg.grad_accum):
                items = batches.next()
                caps = shard.take(enc.captions(items))
                latents, seen = enc.images(items)
                batch = {"items": shard.take(items), "captions": caps, "shard": shard,
                         "encode_text": enc.text_embeddings, **seen}

                def compute():
                    with autocast:
                        context = enc.text_embeddings(caps)
                        return method.loss(model, latents, context, objective, g, cfg, batch)

                sync = ddp is None or micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    loss = compute() if ddp is None else ddp(compute)
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                total += float(loss.detach()) / cfg.grad_accum
            total = distributed.mean(total, shard)
            if not math.isfinite(total):
                raise FloatingPointError(f"the loss became {total} at step {step + 1}: lower the learning_rate, or "
                                         "train in bf16 (mixed_precision bf16) or in fp32 (load the model with dtype "
                                         "fp32, and mixed_precision no)")
            if scaler:
                scaler.unscale_(opt)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            lr = float(sched.get_last_lr()[0])  # Adafactor's own schedule gives a tensor
            sched.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            if ema is not None:
                ema.update(step + 1)
            step += 1
            row = {"step": step, "loss": total, "lr": lr, "seconds": round(time.time() - t0, 4)}
            log_rows.append(row)
            pending.append(row)
            at_boundary = True
            if cb.on_step:
                cb.on_step(StepInfo(step, cfg.steps, total, lr, row["seconds"]))
            save_now = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.steps
            show_now = bool(cfg.validation_prompt and cfg.validation_every) and step % cfg.validation_every == 0
            stop_early = see(step, row, show_now, save_now and keeper is not None)
            if save_now:
                pending.flush()
                checkpoint(step)
                if distributed.agree(stop_early, shard):
                    stopped_early = True
                    break
        if keeper is not None and not cancelled and (not keeper.history or keeper.history[-1]["step"] != step):
            see(step, log_rows[-1], False, True)  # the last step is a candidate too
        pending.flush()
        checkpoint(step)
        best = keeper.status() if keeper is not None else {}
        run.status("cancelled" if cancelled else "finished", step=step, total=cfg.steps, **best,
                   **({"stopped_early": True} if stopped_early else {}))
        if keeper is not None and not cancelled and shard.main and keeper.best_step not in (None, step):
            restore(keeper.best_step)  # the result is the best-scoring checkpoint's weights
        optimizers.finish(opt)  # schedule-free: what is handed on is the averaged weights
        if ema is not None and not cancelled:
            ema.copy_to_params()  # the moving average is the result
    except BaseException as e:
        # ComfyUI's Cancel arrives as an exception from a progress callback, between steps: keep that step
        interrupt = isinstance(e, KeyboardInterrupt) or type(e).__name__ in ("InterruptProcessingException",
                                                                             "Interrupted")
        pending.flush()
        if at_boundary and step > 0:
            try:
                checkpoint(step)
            except Exception:  # never hide the original error behind a failed save
                log.exception("could not write a checkpoint at step %d", step)
        if isinstance(e, torch.OutOfMemoryError) and not isinstance(e, validation.OutOfMemory):
            e = torch.OutOfMemoryError(memory_advice(model, cfg, dataset, step, run.name, checkpointed=step > 0))
        run.status("cancelled" if interrupt else "failed", step=step, total=cfg.steps,
                   error=f"{type(e).__name__}: {e}")
        if isinstance(e, torch.OutOfMemoryError):
            raise e from None
        raise
    distributed.barrier(shard)  # rank 0's last checkpoint is on disk before any rank returns
    for m in model.parts().values():
        m.eval()
    return TrainResult(model, method, log_rows, full_config, run.path, step, cancelled, time.time() - t_start,
                       resumed_from, keeper.best_step if keeper is not None else None)
