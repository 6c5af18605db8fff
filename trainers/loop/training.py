"""The training loop every method shares (LoRA, Textual Inversion, DreamBooth, ControlNet).

:func:`train` drives one :class:`.run.TrainingRun` stage by stage: open it, then step by step draw a batch, encode it
(cached when the encoders are frozen), add noise at random timesteps, predict, weight the loss, step the optimizer,
log, show and save; finish it. A *method* object says what trains (see :class:`Method`); *callbacks* report progress
and ask whether to stop, and Cancel raised from one as :class:`Interrupted` keeps the step that finished. Every
random choice comes from one ``torch.Generator`` whose state is checkpointed with the weights, the optimizer, the LR
schedule and the position in the data, so a resumed run continues bit-for-bit where it stopped (on the CPU).

Under ``torchrun`` the same loop runs on every rank (:mod:`.distributed`): the generator draws each global batch on
every rank alike, each rank trains its slice, DistributedDataParallel averages the gradients, and rank 0 alone
writes the run folder.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..config.recipes import TrainConfig
from ..data import masks
from ..data.dataset import Dataset
from ..model.model import FTModel
from ..objectives.base import Objective, diffusion_loss
from ..runs.run_dir import RunDir
from .cancel import Interrupted  # noqa: F401  (the library's Cancel: raise it from a callback)
from .batches import Batch  # noqa: F401  (what a method's loss takes, re-exported)
from .distributed import SINGLE, Shard
from .run import Callbacks, StepInfo, TrainingRun, TrainResult  # noqa: F401  (the loop's interface, re-exported)

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

    def predict(self, model: FTModel, noisy, t, context, batch: Batch):
        """The model's prediction for ``noisy`` at ``t`` (a ControlNet adds its residuals here)."""
        return model.denoise(noisy, t, context, batch.framing)

    def sample_kwargs(self) -> dict:
        """Extra arguments of validation sampling (a ControlNet passes its condition)."""
        return {}

    def loss(self, model: FTModel, batch: Batch, objective: Objective):
        """The denoising loss of one batch; methods with extra terms (prior preservation, ControlNet) override.
        ``batch["shard"]`` is this process's part of a distributed run: draw through it; ``batch["encode_text"]``
        embeds more captions the way the loop does (cached while the text encoder is frozen)."""
        noisy, t, target = self.noised(batch.latents, objective, batch)
        pred = self.predict(model, noisy, t, batch.context, batch)
        return self.loss_of(pred, target, t, objective, batch)

    def noised(self, latents, objective: Objective, batch: Batch):
        """(noisy latents, timesteps, target) of one batch: its noise and timesteps drawn from ``g`` by the model's
        objective."""
        return objective.noised(latents, batch.generator, batch.cfg.noise_offset, shard=batch.shard)

    def loss_of(self, pred, target, t, objective: Objective, batch: Batch):
        """The loss of a prediction: the objective's weights per timestep (min-SNR), and the batch's masks where it
        has them."""
        cfg = batch.cfg
        w = objective.weights(t, cfg)
        mask = batch.masks
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


def train(model: FTModel, dataset: Dataset, method: Method, cfg: TrainConfig, run: RunDir,
          callbacks: Callbacks | None = None, resume: bool = False, extra_config: dict | None = None,
          shard: Shard = SINGLE, scorer=None) -> TrainResult:
    """Train ``method`` on ``model`` (changed in place: pass ``base.share()``, whose frozen weights stay the base's)
    and return the result.

    ``resume`` continues from the newest complete checkpoint in ``run``. When ``callbacks.should_stop`` turns true
    (on rank 0) the loop writes a checkpoint at the current step and returns with ``cancelled=True``. ``cfg.batch_size``
    is per process: the global batch of a distributed run is ``batch_size × shard.world``.
    """
    r = TrainingRun(model, dataset, method, cfg, run, callbacks, shard, scorer)
    r.open(resume, extra_config)
    with r.guard():
        while r.at < cfg.steps and not r.should_stop():
            if r.after_step(r.step()):
                break  # keep_best: the score stopped improving
        r.finish()
    return r.result()
