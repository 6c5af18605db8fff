"""One training run, as :func:`.training.train` drives it: :meth:`TrainingRun.open` sets it up,
:meth:`~TrainingRun.step` trains one optimizer step, :meth:`~TrainingRun.after_step` logs, shows, scores and saves
it, :meth:`~TrainingRun.finish` ends the run, and :meth:`~TrainingRun.guard` keeps what it can when something stops
it. Also the loop's interface: the :class:`Callbacks` it calls, the :class:`StepInfo` it reports and the
:class:`TrainResult` it returns.

Every random choice comes from the run's one ``torch.Generator`` (``g``: the data order, the encoder's and the
method's draws), in the order the stages run; a checkpoint stores its state, so a resume continues exactly.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed, optimizers, validation
from .batches import Batch, Batches, Encoder
from .cancel import CANCELS
from .distributed import SINGLE, Shard
from .ema import EMA, swapped_in
from .precision import (autocast_for, enable_checkpointing, gpu_options, memory_advice, place_for_training,
                        place_unet, release_frozen)
from .state import LoopState
from .validation import BestKeeper
from ..config.recipes import TrainConfig, run_config
from ..data.dataset import Dataset, prepare
from ..model.model import FTModel
from ..runs.run_dir import RunDir, TrainingLog, save_dataset

#: ``Method`` in annotations is :class:`.training.Method` (the contract training.py declares and imports this
#: module for; named, not imported, so the two do not import each other)

log = logging.getLogger(__name__)


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
    #: draws the validation pictures in the pack's sampler's place: (model, method, seeds, width, height) -> IMAGE
    #: (inside ComfyUI, ComfyUI's own sampler: nodes/comfy_preview.py)
    draw: Callable[..., torch.Tensor] | None = None


@dataclass
class TrainResult:
    """What a training gives back, the one result type: the loop's record of the run (its log rows, config, step,
    time) and, once the method has handed over (:meth:`handed_over`), the tuned model and what was trained. When it
    was cancelled, ``model`` and ``result`` are None after the hand-over (the checkpoint is written: resume the
    run)."""

    #: the training's own model until the hand-over, then the tuned model for the graph
    model: FTModel | None
    method: Method
    log: list[dict]  #: the log rows (step, loss, lr, seconds, scores)
    config: dict
    run_dir: Path
    step: int
    cancelled: bool
    seconds: float
    resumed_from: int | None = None
    best_step: int | None = None  #: keep_best: the step whose checkpoint is the result
    #: what was trained: a LoRA, an Embedding, a ControlNet (None for a full fine-tune: the weights are the model's)
    result: Any = None
    #: more a method hands on (DreamBooth's pivotal embedding)
    extra: dict = field(default_factory=dict)

    @property
    def training_log(self) -> TrainingLog:
        """The run's log as it flows on the canvas (FT_TRAINING_LOG)."""
        return TrainingLog.from_result(self)

    def handed_over(self, model: FTModel | None, result: Any, extra: dict | None = None) -> "TrainResult":
        """This result with the tuned model and what was trained (both None when the run was cancelled)."""
        return replace(self, model=model, result=result, extra=dict(extra or {}))


class _Trainable(torch.nn.Module):
    """Every module whose weights may train, under one module for DistributedDataParallel: its forward runs the
    loss function it is given, so DDP sees the forward and all-reduces the gradients of the backward."""

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


class TrainingRun:
    """One training of ``method`` on ``model`` into ``run``: the loop's state, which its stages share. ``at`` is the
    number of optimizer steps done; ``at_boundary`` is True between steps, when a checkpoint resumes exactly."""

    def __init__(self, model: FTModel, dataset: Dataset, method: Method, cfg: TrainConfig, run: RunDir,
                 callbacks: Callbacks | None = None, shard: Shard = SINGLE, scorer=None):
        self.model, self.dataset, self.method, self.cfg, self.run = model, dataset, method, cfg, run
        self.cb, self.shard, self.scorer = callbacks or Callbacks(), shard, scorer
        self.t_start = time.time()
        self.at, self.log_rows, self.resumed_from = 0, [], None
        self.cancelled = self.stopped_early = False
        self.at_boundary = True

    # ------------------------------------------------------------------------------------------------- setup --
    def open(self, resume: bool = False, extra_config: dict | None = None) -> None:
        """Set the run up: data, encoder, method, optimizer, moving average, autocast, objective, DDP; release the
        frozen parts, tidy what a killed run left, resume, write config.json and the status."""
        cfg, shard, dataset = self.cfg, self.shard, self.dataset
        global_batch = cfg.batch_size * shard.world
        if len(dataset) < global_batch:
            raise ValueError(f"batch_size {global_batch} is larger than the dataset ({len(dataset)} pictures with "
                             f"repeats): lower batch_size or raise the dataset's repeats")
        validation.check(cfg, self.scorer)
        self.identity = self.model.identity()  # the base model as given, before the method adds anything
        self.g = torch.Generator().manual_seed(cfg.seed)
        self._open_data(global_batch)
        self._open_training()
        self._tidy()
        self.state = LoopState(self.method, self.opt, self.sched, self.scaler, self.g, self.batches, self.ema)
        if resume:
            self._resume()
        optimizers.for_training(self.opt)  # schedule-free: the weights at their training values (as checkpoints)
        self._write_config(extra_config)
        self.run.status("running", step=self.at, total=cfg.steps)
        self.keeper = BestKeeper.create(cfg, self.scorer, dataset)
        if self.keeper is not None and resume:
            self.keeper.replay(self.log_rows)
        if not resume and self.model.family.sound_preset and cfg.validation_prompt and cfg.validation_every \
                and self.shard.main:  # the sound before training, at the validation seeds: step-0-<i>.wav
            validation.pictures(self.model, self.method, cfg, self.run, 0, [self.autocast], dataset.resolution)
        self.pending = self.run.log_writer(self.log_rows, cfg.steps)  # log.jsonl every few seconds, cut back on resume

    def _open_data(self, global_batch: int) -> None:
        """The batches and the encoder (with the method's extra pictures encoded). An offloaded model's parts visit
        the device for the run: the VAE and the text encoders first, which leave once the latents and the captions'
        embeddings are cached (where nothing encodes them again); the denoiser after them, so that it never meets
        them on the GPU (Z-Image's Qwen3-4B is 8 GB beside its 12 GB transformer; SDXL's VAE encoding 2.5 GB at
        1024 px)."""
        model = self.model
        home = place_for_training(model)
        prepared = prepare(self.dataset, model.native_size, model.size_step)
        self.batches = Batches(prepared, global_batch, self.g)
        self.enc = Encoder(model, self.dataset, self.method, prepared, self.g, self.shard)
        self.method.encode_extra(model)
        left = release_frozen(model, self.enc, self.method, self.dataset, home)
        if left:
            log.info("%s left %s once their outputs were cached", " and ".join(left), model.device)
        place_unet(model, home)

    def _open_training(self) -> None:
        """The method's trainable parts, the optimizer and schedule, the moving average, autocast, the objective,
        and DistributedDataParallel over the trainable modules of a distributed run."""
        model, method, cfg = self.model, self.method, self.cfg
        groups, self.params = _prepare_method(model, method, cfg)
        self.opt, self.sched = optimizers.make(groups, cfg)
        self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_start, cfg.ema_every) if cfg.ema_decay else None
        self.autocast, self.scaler = autocast_for(model, cfg)
        self.objective = model.objective()
        self.ddp = None
        if self.shard.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            tes = model.text_encoders if method.trains_text_encoder else []  # frozen ones may leave the device
            trainable = _Trainable([model.denoiser, *tes, *method.train_modules(model)])
            # SDXL reads its first encoder's penultimate layer: the last one trains nothing, which DDP must be told
            self.ddp = DistributedDataParallel(trainable, broadcast_buffers=False,
                                               find_unused_parameters=len(tes) > 1,
                                               device_ids=[model.device.index] if model.device.type == "cuda" else None)

    def _tidy(self) -> None:
        """Remove what a killed run left half-written: unfinished checkpoints and temporary files."""
        if self.run.writes:
            from ..runs.atomic import clean_stale

            for folder in (self.run.path, self.run.path / "checkpoints"):
                for name in clean_stale(folder):
                    log.info("removed %s/%s, left unfinished by an earlier process", folder.name, name)
        distributed.barrier(self.shard)  # every rank lists the checkpoints after rank 0 has tidied them

    def _resume(self) -> None:
        """Continue from the newest checkpoint that is whole and reads (:meth:`.state.LoopState.resume`)."""
        self.at, self.log_rows = self.state.resume(self.run, self.cfg.steps)
        self.resumed_from = self.at
        log.info("resumed %s from step %d", self.run.name, self.at)

    def _write_config(self, extra_config: dict | None) -> None:
        run, dataset = self.run, self.dataset
        snapshot = {}
        if run.writes and not (run.path / "dataset" / "dataset.json").is_file():
            snapshot = save_dataset(run.path / "dataset", dataset, self.method.extra_sets())
        elif (run.path / "config.json").is_file():
            snapshot = run.read_json("config.json").get("dataset", {}).get("snapshot_info", {})
        self.config = run_config(self.cfg, self.identity, {**dataset.describe(), "snapshot_info": snapshot},
                                 world_size=self.shard.world, **(extra_config or {}))
        run.write_json("config.json", self.config)

    # -------------------------------------------------------------------------------------------------- steps --
    def should_stop(self) -> bool:
        """True (and the run cancelled) when the callbacks ask to stop, as rank 0 says."""
        stop = self.cb.should_stop is not None and self.cb.should_stop()
        self.cancelled = distributed.agree(stop, self.shard)
        return self.cancelled

    def step(self) -> dict:
        """One optimizer step over ``cfg.grad_accum`` micro-batches; returns its log row."""
        self.at_boundary = False
        t0 = time.time()
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            total += self._micro_batch(micro)
        total = distributed.mean(total, self.shard)
        if not math.isfinite(total):
            raise FloatingPointError(f"the loss became {total} at step {self.at + 1}: lower the learning_rate, or "
                                     "train in bf16 (mixed_precision bf16) or in fp32 (load the model with dtype "
                                     "fp32, and mixed_precision no)")
        lr = self._optimizer_step()
        self.method.after_step()
        if self.ema is not None:
            self.ema.update(self.at + 1)
        self.at += 1
        return {"step": self.at, "loss": total, "lr": lr, "seconds": round(time.time() - t0, 4)}

    def _micro_batch(self, micro: int) -> float:
        """Draw, encode and backpropagate one micro-batch; returns its share of the step's loss."""
        cfg, shard, enc = self.cfg, self.shard, self.enc
        items = self.batches.next()
        caps = shard.take(enc.captions(items))
        latents, seen = enc.images(items)
        batch = Batch(latents, caps, self.g, cfg, shard, enc.text_embeddings, shard.take(items), **seen)
        compute = functools.partial(self._loss, batch)
        sync = self.ddp is None or micro == cfg.grad_accum - 1
        with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
            loss = compute() if self.ddp is None else self.ddp(compute)
            scaled = loss / cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return float(loss.detach()) / cfg.grad_accum

    def _loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast:
            batch.context = self.enc.text_embeddings(batch.captions)
            return self.method.loss(self.model, batch, self.objective)

    def _optimizer_step(self) -> float:
        """Unscale, clip, step and schedule; returns the learning rate the step used."""
        opt, scaler = self.opt, self.scaler
        if scaler:
            scaler.unscale_(opt)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        lr = float(self.sched.get_last_lr()[0])  # Adafactor's own schedule gives a tensor
        self.sched.step()
        opt.zero_grad(set_to_none=True)
        return lr

    def after_step(self, row: dict) -> bool:
        """Log the step, tell the callbacks, make its validation pictures (scored for keep_best at save points) and
        save it when it is a save point; True when keep_best's score says stop."""
        cfg, at = self.cfg, self.at
        self.log_rows.append(row)
        self.pending.append(row)
        self.at_boundary = True
        if self.cb.on_step:
            self.cb.on_step(StepInfo(at, cfg.steps, row["loss"], row["lr"], row["seconds"]))
        save_now = bool(cfg.save_every) and at % cfg.save_every == 0 and at < cfg.steps
        show_now = bool(cfg.validation_prompt and cfg.validation_every) and at % cfg.validation_every == 0
        stop_early = self._see(row, show_now, save_now and self.keeper is not None)
        if not save_now:
            return False
        self.pending.flush()
        self.checkpoint()
        self.stopped_early = distributed.agree(stop_early, self.shard)
        return self.stopped_early

    def _see(self, row: dict, show: bool, score: bool) -> bool:
        """Validation pictures of this step (shown when asked, scored for keep_best into ``row``); True when the
        score says stop."""
        if not self.shard.main or not (show or score):
            return False
        at, cb = self.at, self.cb
        # the weights the result would be
        contexts = [self.autocast, optimizers.averaged(self.opt, self.params), swapped_in(self.ema)]
        imgs = validation.pictures(self.model, self.method, self.cfg, self.run, at, contexts,
                                   self.dataset.resolution, cb.draw)
        if show and cb.on_preview:
            cb.on_preview(at, imgs)
        if not score:
            return False
        scores = self.keeper.score(imgs, self.cfg.validation_prompt)
        row.update(scores)
        stop = self.keeper.record(at, scores)
        if cb.on_score:
            cb.on_score(at, scores, self.keeper.best_step)
        return stop

    def checkpoint(self) -> Path | None:
        """Save this step (rank 0 writes; the others return None)."""
        if not self.run.writes:
            return None
        folder = self.state.save(self.run, self.at, self.log_rows)
        if self.cb.on_checkpoint:
            self.cb.on_checkpoint(self.at, folder)
        return folder

    # ---------------------------------------------------------------------------------------------------- end --
    def finish(self) -> None:
        """Score the last step (keep_best), save it, write the status; then the result's weights: the best
        checkpoint's (keep_best), the schedule-free average, the moving average."""
        keeper, at, cancelled = self.keeper, self.at, self.cancelled
        if keeper is not None and not cancelled and (not keeper.history or keeper.history[-1]["step"] != at):
            self._see(self.log_rows[-1], False, True)  # the last step is a candidate too
        self.pending.flush()
        self.checkpoint()
        if keeper is not None and not cancelled and self.shard.main and keeper.best_step not in (None, at):
            # the result is the best-scoring checkpoint's weights (a damaged one is skipped for the next best)
            row = self.state.load_best(self.run, keeper.history, at)
            keeper.best_step, keeper.best_value = row["step"], row["score"]
            log.info("the result is step %d's checkpoint (best %s %.4f)", row["step"], keeper.ranking, row["score"])
        best = keeper.status() if keeper is not None else {}
        self.run.status("cancelled" if cancelled else "finished", step=at, total=self.cfg.steps, **best,
                        **({"stopped_early": True} if self.stopped_early else {}))
        optimizers.finish(self.opt)  # schedule-free: what is handed on is the averaged weights
        if self.ema is not None and not cancelled:
            self.ema.copy_to_params()  # the moving average is the result

    @contextlib.contextmanager
    def guard(self):
        """Around the steps: whatever stops them (a cancel, an error) finds the log flushed and, between steps, the
        step that finished checkpointed; an out-of-memory error gains advice; the status says cancelled (Cancel
        raised from a callback as :class:`.cancel.Interrupted`, or Ctrl-C) or failed."""
        try:
            yield
        except BaseException as e:
            self.pending.flush()
            if self.at_boundary and self.at > 0:
                try:
                    self.checkpoint()
                except Exception:  # never hide the original error behind a failed save
                    log.exception("could not write a checkpoint at step %d", self.at)
            if isinstance(e, torch.OutOfMemoryError) and not isinstance(e, validation.OutOfMemory):
                e = torch.OutOfMemoryError(memory_advice(self.model, self.cfg, self.dataset, self.at, self.run.name,
                                                         checkpointed=self.at > 0))
            self.run.status("cancelled" if isinstance(e, CANCELS) else "failed", step=self.at,
                            total=self.cfg.steps, error=f"{type(e).__name__}: {e}")
            if isinstance(e, torch.OutOfMemoryError):
                raise e from None
            raise

    def result(self) -> TrainResult:
        """What the run gives back, once every rank is done (rank 0's last checkpoint is on disk)."""
        distributed.barrier(self.shard)
        for m in self.model.parts().values():
            m.eval()
        keeper = self.keeper
        return TrainResult(self.model, self.method, self.log_rows, self.config, self.run.path, self.at,
                           self.cancelled, time.time() - self.t_start, self.resumed_from,
                           keeper.best_step if keeper is not None else None)
