"""The training loop every method shares (LoRA, Textual Inversion, DreamBooth, ControlNet).

One explicit function, :func:`train`, stage by stage: draw a batch, encode it (cached when the encoders are
frozen), add noise at random timesteps, predict, weight the loss, step the optimizer. A *method* object says what
trains (see :class:`Method`); *callbacks* report progress and ask whether to stop. Every random choice comes from
one ``torch.Generator`` whose state is checkpointed with the weights, the optimizer, the LR schedule and the
position in the data, so a resumed run continues bit-for-bit where it stopped (on the CPU).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import diffusion
from .data import Dataset, Prepared, prepare, process_caption
from .model import FTModel

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
    "rmsprop": lambda params, lr, wd: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
}
#: names understood by diffusers.optimization.get_scheduler
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LOSSES = ("mse", "huber")
PRECISIONS = ("auto", "no", "fp16", "bf16")


def _choice(name: str, value: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name} {value!r} is not known; choose one of: {', '.join(options)}")


@dataclass
class TrainConfig:
    """Settings of the shared loop. Each field's comment is the tooltip of the node input that sets it."""

    steps: int = 500  #: optimizer steps to train for (in total, counting steps done before a resume)
    learning_rate: float = 1e-4  #: peak learning rate
    batch_size: int = 1  #: pictures per step (all from the same size bucket)
    seed: int = 0  #: seeds every random choice: the same seed and inputs give the same result
    grad_accum: int = 1  #: micro-batches summed into one optimizer step (a larger effective batch)
    max_grad_norm: float = 1.0  #: clip the gradient norm to this (0 = no clipping)
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    loss: str = "mse"
    huber_delta: float = 0.1
    snr_gamma: float = 5.0  #: min-SNR-gamma loss weighting (0 = off; 5 is the paper's value)
    noise_offset: float = 0.0  #: add per-channel offset noise (helps very dark/bright images; 0.05-0.1)
    mixed_precision: str = "auto"  #: auto = bf16 (or fp16) autocast on a GPU, fp32 on the CPU
    gradient_checkpointing: bool = False  #: trade compute for memory on large models
    save_every: int = 0  #: write a checkpoint every N steps (0 = only at the end or on cancel)
    validation_prompt: str = ""  #: sample this prompt every validation_every steps ("" = no validation)
    validation_every: int = 0
    validation_images: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate {self.learning_rate} is out of range: use a value in (0, 1), e.g. 1e-4")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("loss", self.loss, LOSSES)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        for name in ("max_grad_norm", "weight_decay", "snr_gamma", "noise_offset", "warmup_steps", "save_every",
                     "validation_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


class Method:
    """What a training method trains. Subclasses: LoRA, Textual Inversion, DreamBooth, ControlNet."""

    name = "method"
    #: True when the text encoder changes during training (then text embeddings are not cached)
    trains_text_encoder = False

    def setup(self, model: FTModel) -> None:
        """Attach the trainable parts to ``model`` (a copy the method may change)."""
        raise NotImplementedError

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        raise NotImplementedError

    def trainable_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def config(self) -> dict:
        return {"method": self.name}

    def after_step(self) -> None:
        """Called after every optimizer step (Textual Inversion restores the frozen embedding rows here)."""

    def train_modules(self, model: FTModel) -> list[torch.nn.Module]:
        """Modules to put in train mode (default: those holding trainable parameters)."""
        return [model.unet, model.text_encoder] if self.trains_text_encoder else [model.unet]

    def predict(self, model: FTModel, noisy, t, context, batch: dict):
        """The model's prediction for ``noisy`` at ``t`` (a ControlNet adds its residuals here)."""
        return model.unet(noisy, t, encoder_hidden_states=context).sample

    def sample_kwargs(self) -> dict:
        """Extra arguments of validation sampling (a ControlNet passes its condition)."""
        return {}

    def loss(self, model: FTModel, latents, context, noise_sched, g, cfg: TrainConfig, batch: dict):
        """The denoising loss of one batch; methods with extra terms (prior preservation, ControlNet) override."""
        noise = diffusion.sample_noise(latents, g, cfg.noise_offset)
        t = diffusion.sample_timesteps(latents.shape[0], noise_sched, g, latents.device)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = self.predict(model, noisy, t, context, batch)
        target = diffusion.target_for(noise_sched, latents, noise, t)
        w = diffusion.min_snr_weights(noise_sched, t, cfg.snr_gamma) if cfg.snr_gamma else None
        return diffusion.diffusion_loss(pred, target, weights=w, loss_type=cfg.loss, huber_delta=cfg.huber_delta)


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


# --------------------------------------------------------------------------------------------------- run dir --
class RunDir:
    """``<output>/finetune/<run>/``: config.json, log.jsonl, status.json, checkpoints/step-N/, samples/."""

    def __init__(self, path: Path):
        self.path = Path(path)

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
        p = self.path / name
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        tmp.replace(p)

    def status(self, state: str, **extra) -> None:
        self.write_json("status.json", {"status": state, "time": time.time(), **extra})

    def append_log(self, rows: list[dict]) -> None:
        with (self.path / "log.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (their manifest was written last), oldest first."""
        root = self.path / "checkpoints"
        found = []
        for p in root.glob("step-*") if root.is_dir() else []:
            if (p / "manifest.json").is_file() and p.name[5:].isdigit():
                found.append((int(p.name[5:]), p))
        return sorted(found)


def _save_checkpoint(run: RunDir, step: int, method: Method, opt, sched, scaler, g: torch.Generator,
                     data_state: dict, log_rows: list[dict]) -> Path:
    from safetensors.torch import save_file

    folder = run.path / "checkpoints" / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in method.trainable_state().items()},
              str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": g.get_state(),
                "data": data_state}, tmp / "state.pt")
    (tmp / "log.json").write_text(json.dumps(log_rows))
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "method": method.name,
                                                   "files": ["trainable.safetensors", "state.pt", "log.json"]}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def _load_checkpoint(folder: Path, method: Method, opt, sched, scaler, g: torch.Generator):
    from safetensors.torch import load_file

    method.load_trainable_state(load_file(str(folder / "trainable.safetensors")))
    st = torch.load(folder / "state.pt", weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["lr_scheduler"])
    if scaler is not None and st.get("scaler"):
        scaler.load_state_dict(st["scaler"])
    g.set_state(st["rng"])
    return st["data"], json.loads((folder / "log.json").read_text())


# ------------------------------------------------------------------------------------------------------ data --
class Batches:
    """Epochs of shuffled batches, each from one size bucket; its position is part of the checkpoint."""

    def __init__(self, prepared: Prepared, batch_size: int, g: torch.Generator):
        self.p, self.bs, self.g = prepared, batch_size, g
        self.epoch: list[list[int]] = []  # batches of indices into prepared.index
        self.pos = 0

    def _new_epoch(self) -> None:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, (b, _) in enumerate(self.p.index):
            by_bucket.setdefault(b, []).append(i)
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b]
            perm = torch.randperm(len(idx), generator=self.g).tolist()
            idx = [idx[j] for j in perm]
            # a bucket smaller than the batch is topped up by repeating its own pictures
            while len(idx) % self.bs:
                idx.append(idx[len(idx) % len(perm)])
            batches += [idx[k:k + self.bs] for k in range(0, len(idx), self.bs)]
        order = torch.randperm(len(batches), generator=self.g).tolist()
        self.epoch, self.pos = [batches[k] for k in order], 0

    def next(self) -> list[tuple[tuple[int, int], int]]:
        if self.pos >= len(self.epoch):
            self._new_epoch()
        batch = self.epoch[self.pos]
        self.pos += 1
        return [self.p.index[i] for i in batch]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, st: dict) -> None:
        self.epoch, self.pos = [list(b) for b in st["epoch"]], int(st["pos"])


# ------------------------------------------------------------------------------------------------------ loop --
def _autocast(model: FTModel, cfg: TrainConfig):
    import contextlib

    if model.device.type != "cuda" or cfg.mixed_precision == "no":
        return contextlib.nullcontext(), None
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    if dt is None:  # auto
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dt == torch.float16 else None
    return torch.autocast("cuda", dtype=dt), scaler


def train(model: FTModel, dataset: Dataset, method: Method, cfg: TrainConfig, run: RunDir,
          callbacks: Callbacks | None = None, resume: bool = False, extra_config: dict | None = None) -> TrainResult:
    """Train ``method`` on ``model`` (changed in place: pass a copy) and return the result.

    ``resume`` continues from the newest complete checkpoint in ``run``. When ``callbacks.should_stop`` turns true
    the loop writes a checkpoint at the current step and returns with ``cancelled=True``.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    cb = callbacks or Callbacks()
    t_start = time.time()
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(dataset)} pictures with "
                         f"repeats): lower batch_size or raise the dataset's repeats")
    g = torch.Generator().manual_seed(cfg.seed)
    for m in (model.unet, model.vae, model.text_encoder):
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
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            model.text_encoder.gradient_checkpointing_enable()
        for m in method.train_modules(model):
            if m is not model.unet and m is not model.text_encoder and hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
    opt = OPTIMIZERS[cfg.optimizer](groups, cfg.learning_rate, cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    autocast, scaler = _autocast(model, cfg)
    noise_sched = DDPMScheduler.from_config(model.scheduler_config)

    mult = model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)
    prepared = prepare(dataset, model.native_size, mult)
    batches = Batches(prepared, cfg.batch_size, g)
    full_config = {"train": asdict(cfg), **method.config(), "dataset": dataset.describe(),
                   "model": {"family": model.family, "name": model.name, "history": model.history},
                   **(extra_config or {})}

    # frozen encoders -> encode once
    cache_latents = dataset.augment is None
    latent_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    sf = model.vae.config.scaling_factor
    if cache_latents:
        with torch.no_grad():
            for b, px in prepared.pixels.items():
                dists = [model.vae.encode(px[i:i + 16].to(model.device, model.dtype)).latent_dist
                         for i in range(0, len(px), 16)]
                latent_cache[b] = (torch.cat([d.mean for d in dists]).float(), torch.cat([d.std for d in dists]).float())
    text_cache: dict[str, torch.Tensor] = {}

    def encode_text(captions: list[str]) -> torch.Tensor:
        if method.trains_text_encoder:
            return model.encode_prompts(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if missing:
            with torch.no_grad():
                for c, e in zip(missing, model.encode_prompts(missing)):
                    text_cache[c] = e
        return torch.stack([text_cache[c] for c in captions])

    def encode_images(items) -> tuple[torch.Tensor, dict]:
        """Latents of a batch, and the pictures (after augmentation) and paired conditions they came from."""
        b = items[0][0]
        idx = torch.tensor([i for _, i in items])
        px = prepared.pixels[b][idx]
        cond = prepared.conditions[b][idx] if prepared.conditions else None
        if cache_latents:
            mean, std = latent_cache[b]
            eps = torch.randn(mean[idx].shape, generator=g).to(mean.device)
            return ((mean[idx] + std[idx] * eps) * sf).to(model.dtype), {"pixels": px, "conditions": cond}
        if cond is not None:
            px, cond = augment_batch(px, dataset.augment, g, condition=cond)
        else:
            px = augment_batch(px, dataset.augment, g)
        with torch.no_grad():
            dist = model.vae.encode(px.to(model.device, model.dtype)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=g).to(dist.mean.device, dist.mean.dtype)
        return (dist.mean + dist.std * eps) * sf, {"pixels": px, "conditions": cond}

    def caption_for(own: str) -> str:
        if not dataset.caption_templates:
            return own
        k = int(torch.randint(len(dataset.caption_templates), (1,), generator=g))
        return dataset.caption_templates[k].format(dataset.template_token)

    step, log_rows, resumed_from = 0, [], None
    if resume:
        ckpts = run.checkpoints()
        if not ckpts:
            raise FileNotFoundError(f"nothing to resume in run {run.path.name}: it has no complete checkpoint")
        step, folder = ckpts[-1]
        data_state, log_rows = _load_checkpoint(folder, method, opt, sched, scaler, g)
        batches.load(data_state)
        resumed_from = step
        log.info("resumed %s from step %d", run.path.name, step)
    run.write_json("config.json", full_config)
    run.status("running", step=step, total=cfg.steps)

    def checkpoint(at: int) -> Path:
        folder = _save_checkpoint(run, at, method, opt, sched, scaler, g, batches.state(), log_rows)
        if cb.on_checkpoint:
            cb.on_checkpoint(at, folder)
        return folder

    cancelled = False
    pending: list[dict] = []
    at_boundary = True  # the state is consistent (between steps): a checkpoint taken now resumes exactly
    try:
        while step < cfg.steps:
            if cb.should_stop is not None and cb.should_stop():
                cancelled = True
                break
            at_boundary = False
            t0 = time.time()
            total = 0.0
            for _ in range(cfg.grad_accum):
                items = batches.next()
                caps = [process_caption(caption_for(prepared.captions[b][i]), shuffle=dataset.shuffle_captions,
                                        keep=dataset.keep_tokens, dropout=dataset.caption_dropout, generator=g)
                        for b, i in items]
                latents, seen = encode_images(items)
                with autocast:
                    context = encode_text(caps)
                    loss = method.loss(model, latents, context, noise_sched, g, cfg,
                                       {"items": items, "captions": caps, **seen})
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                total += float(loss.detach()) / cfg.grad_accum
            if not math.isfinite(total):
                raise FloatingPointError(f"the loss became {total} at step {step + 1}: lower the learning_rate "
                                         "or use mixed_precision 'no'")
            if scaler:
                scaler.unscale_(opt)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            lr = sched.get_last_lr()[0]
            sched.step()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            step += 1
            row = {"step": step, "loss": total, "lr": lr, "seconds": round(time.time() - t0, 4)}
            log_rows.append(row)
            pending.append(row)
            at_boundary = True
            if cb.on_step:
                cb.on_step(StepInfo(step, cfg.steps, total, lr, row["seconds"]))
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                run.append_log(pending); pending = []
                checkpoint(step)
            if cfg.validation_prompt and cfg.validation_every and step % cfg.validation_every == 0:
                _validate(model, method, cfg, run, step, cb)
        run.append_log(pending); pending = []
        checkpoint(step)
        run.status("cancelled" if cancelled else "finished", step=step, total=cfg.steps)
    except BaseException as e:
        # ComfyUI's Cancel arrives as an exception from a progress callback, between steps: keep that step
        interrupt = isinstance(e, KeyboardInterrupt) or type(e).__name__ in ("InterruptProcessingException",
                                                                             "Interrupted")
        run.append_log(pending)
        if at_boundary and step > 0:
            try:
                checkpoint(step)
            except Exception:  # never hide the original error behind a failed save
                log.exception("could not write a checkpoint at step %d", step)
        run.status("cancelled" if interrupt else "failed", step=step, total=cfg.steps,
                   error=f"{type(e).__name__}: {e}")
        raise
    for m in (model.unet, model.text_encoder):
        m.eval()
    return TrainResult(model, method, log_rows, full_config, run.path, step, cancelled, time.time() - t_start,
                       resumed_from)


def _validate(model: FTModel, method: Method, cfg: TrainConfig, run: RunDir, step: int, cb: Callbacks) -> None:
    from .grids import to_pil
    from .sampling import sample

    mods = method.train_modules(model)
    for m in mods:
        m.eval()
    with torch.no_grad():
        imgs = sample(model, cfg.validation_prompt, seeds=[cfg.seed + i for i in range(cfg.validation_images)],
                      steps=20, **method.sample_kwargs())
    for m in mods:
        m.train()
    folder = run.path / "samples"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(imgs):
        to_pil(im).save(folder / f"step-{step}-{i}.png")
    if cb.on_preview:
        cb.on_preview(step, imgs)


def augment_batch(px: torch.Tensor, aug, g: torch.Generator, condition: torch.Tensor | None = None):
    """Random flip, resized crop and colour jitter with kornia, drawn from ``g``.

    With a paired ``condition`` (B, 3, H, W in 0..1) the flip and crop move picture and condition together, the
    colour jitter touches only the picture, and the pair is returned.
    """
    if aug is None:
        return px if condition is None else (px, condition)
    import kornia.augmentation as K

    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
    geo = []
    if aug.flip:
        geo.append(K.RandomHorizontalFlip(p=aug.flip))
    if aug.crop_scale < 1:
        geo.append(K.RandomResizedCrop(px.shape[-2:], scale=(aug.crop_scale, 1.0)))
    if not geo and not aug.color_jitter:
        return px if condition is None else (px, condition)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # kornia draws from the global RNG: seed it from ours, then put it back
    try:
        x = (px + 1) / 2
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        if geo:
            x = K.AugmentationSequential(*geo)(x)
        img, cond = x[:, :3], x[:, 3:]
        if aug.color_jitter:
            j = aug.color_jitter
            img = K.ColorJitter(j, j, j, j / 4, p=1.0)(img)
    finally:
        torch.random.set_rng_state(state)
    img = img.clamp(0, 1) * 2 - 1
    return img if condition is None else (img, cond.clamp(0, 1))


@dataclass
class TrainingLog:
    """``FT_TRAINING_LOG``: loss per step, learning rate, timings and the full config of a run."""

    rows: list[dict]
    config: dict
    run: str
    steps: int
    seconds: float
    resumed_from: int | None = None

    @classmethod
    def from_result(cls, r: TrainResult) -> "TrainingLog":
        return cls(list(r.log), r.config, r.run_dir.name, r.step, round(r.seconds, 2), r.resumed_from)

    def losses(self) -> list[float]:
        return [row["loss"] for row in self.rows]

    def __repr__(self) -> str:
        return f"TrainingLog(run {self.run!r}, {self.steps} steps)"
