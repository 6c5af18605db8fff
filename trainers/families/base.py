"""A model family as a class: what a family's models are made of and how they are driven, in one place.

ComfyUI keeps each family as one class (``comfy/supported_models.py``); so does the pack. A :class:`Family` holds the
facts (sizes, configs, file layouts, metadata, GPU defaults) and the behaviour that differs between families: which
parts a model has, how prompts become the denoiser's conditioning, the latent format, the training objective and
the samplers, the names its adapters take in files, and what it cannot train yet. :class:`~..model.model.FTModel`
holds a family object and its parts; the loop, the methods and the nodes ask them, never a family's name.

Adding a family is one subclass (or one instance of a lineage's class) in :mod:`.registry`, its shipped configs,
its key maps, a toy of its architecture and a row in the tests over every family.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: the toy's shipped weights (trainers/toy/weights), whose folders carry their own configs
TOY_WEIGHTS = Path(__file__).resolve().parents[1] / "toy" / "weights"


@dataclass(frozen=True)
class LatentFormat:
    """How VAE latents become what the denoiser works on: ``(z - shift) * scale`` (SD's scale 0.18215, SDXL's
    0.13025, no shift; the Flux VAE shifts too)."""

    scale: float
    shift: float = 0.0

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale if self.shift else z * self.scale

    def to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.shift if self.shift else x / self.scale


@dataclass(frozen=True)
class Family:
    """The facts of one family; subclasses add the behaviour of a lineage (:class:`~.sd.SD`, :class:`~.sdxl.SDXL`)."""

    name: str
    label: str
    #: folder under the pack's configs/ holding a diffusers layout without weights (None: not single-file)
    config: str | None
    native_size: int
    #: text-encoder width = the denoiser's cross-attention width, used to recognise a model
    context_dim: int
    #: dtype for sampling and frozen weights on a GPU
    gpu_dtype: str = "fp16"
    #: what a single file's weights predict: state dict -> "epsilon" or "v_prediction" (None: the shipped config's)
    detect: Callable[[dict[str, Any]], str] | None = None
    #: native size per prediction type, where it differs from native_size (SD 2.x: the 512 px base models predict
    #: epsilon, the 768 px models v)
    sizes: tuple[tuple[str, int], ...] = ()
    #: the text encoders in a single-file checkpoint, in the model's order: (layout, key prefix), the layout "clip"
    #: (transformers' names, SD 1.x) or "open_clip" (OpenCLIP's fused resblocks, SD 2.x and SDXL's second encoder);
    #: empty: the family has no single-file layout (save a diffusers folder)
    text_encoder_files: tuple[tuple[str, str], ...] = ()
    #: modelspec.architecture of its single-file checkpoints
    architecture: str = ""
    #: kohya's ss_base_model_version in its LoRA files (A1111 and the LoRA browsers group by it)
    base_model_version: str = ""
    #: guidance of the class pictures DreamBooth generates from it (the base model's own classes)
    class_cfg: float = 7.0
    #: the guidance its samples and validation pictures are drawn at when their cfg is 0 (auto). Real families'
    #: are their diffusers pipelines' defaults; a toy's is measured on what it learnt by benchmarks/bench_concepts.py
    #: (a fine-tuned model's new subject can need less guidance than the base's classes)
    sample_cfg: float = 7.5
    #: its VAE overflows in fp16 (SDXL's; its config says force_upcast): it stays in fp32 beside an fp16 model
    vae_upcast: bool = False
    #: its denoiser's activations at native size outgrow a 10-12 GB GPU (SDXL's: a LoRA at 1024 px, batch 1):
    #: training with gradient_checkpointing "auto" turns checkpointing on for it on a GPU
    checkpointing_on_gpu: bool = False
    #: the learning rate each method starts from on this family when its learning_rate is 0 (auto): (method, or
    #: "method:mode", the rate); the loop scales it for the adapter kind and the
    #: optimizer (loop.session.resolve_auto). Real SD's are the field's
    #: (kohya's, diffusers' examples); a toy's are measured by benchmarks/bench_concepts.py
    learning_rates: tuple[tuple[str, float], ...] = (
        ("lora", 1e-4), ("dreambooth", 1e-4), ("dreambooth:full", 5e-6), ("textual_inversion", 5e-3),
        ("controlnet", 1e-5))
    #: the steps each subject of a run trains for when its steps is 0 (auto): (method, or "method:mode", steps per
    #: subject). A run of several DreamBooth subjects trains that many times as long, so each is drawn as often as
    #: it would be alone (kohya's repeats work the same way). Real SD's is the node's long-standing 400; a toy's is
    #: measured by benchmarks/bench_concepts.py
    train_steps: tuple[tuple[str, int], ...] = (("dreambooth", 400),)
    #: the instance pictures per step when a DreamBooth run's batch_size is 0 (auto): (method, or "method:mode",
    #: batch). 1, the node's default before auto; a toy's is measured by benchmarks/bench_concepts.py
    train_batch: tuple[tuple[str, int], ...] = (("dreambooth", 1),)
    #: the layers a LoRA-kind adapter trains on this family when target_modules is "auto": (method, preset of
    #: methods.lora.TARGETS). Real SD's are the field's (kohya's LoRA on attention; DreamBooth's LoRA with the
    #: feed-forward too); a toy's are measured by benchmarks/bench_concepts.py
    lora_targets: tuple[tuple[str, str], ...] = (("lora", "attention"), ("dreambooth", "attention+feedforward"))
    #: what the pack cannot train on this family yet: (method, or "method:mode", the reason)
    not_yet: tuple[tuple[str, str], ...] = ()
    #: its pictures are spectrograms of this preset (trainers/audio/spectrogram.py; the toy audio model): a run's
    #: validation writes their sound beside them, and the base model's before the first step
    sound_preset: str | None = None

    #: what a lineage's models are made of (class attributes, not fields). The model's parts by name, in order: the
    #: denoiser first, the VAE, then the text encoders (each with its tokenizer)
    denoiser_part: ClassVar[str] = "unet"
    #: the sampler that draws its validation pictures, class pictures and samples unless one is named
    default_sampler: ClassVar[str] = "ddim"
    sampler_label: ClassVar[str] = "DDIM"
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer",)
    #: a whole single-file checkpoint of a family whose parts keep their own layouts (Z-Image's, as ComfyUI's
    #: CheckpointSave writes it): where each part sits; empty: the UNet families' original (LDM) layout (.ldm)
    checkpoint_parts: ClassVar[dict[str, str]] = {}
    #: ComfyUI's model class (comfy/supported_models.py) of such a family's models: its bridges take them part by
    #: part (the UNet families are recognised by their weights)
    comfy_class: ClassVar[str] = ""

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.denoiser_part, "vae", *self.text_parts)

    # ------------------------------------------------------------------------------------------- configs --
    def size_for(self, prediction: str) -> int:
        return dict(self.sizes).get(prediction, self.native_size)

    @property
    def config_dir(self) -> Path | None:
        return CONFIGS / self.config if self.config else None

    def unet_config(self) -> dict[str, Any]:
        """The shipped diffusers config of this family's denoiser (empty for the toys, whose folders carry
        theirs)."""
        return json.loads((self.config_dir / self.denoiser_part / "config.json").read_text()) \
            if self.config_dir else {}

    @property
    def controlnet_config(self) -> Path:
        """The diffusers config of this family's ControlNets (the toy's: its shipped toy ControlNet's)."""
        return (self.config_dir or TOY_WEIGHTS) / "controlnet" / "config.json"

    def check_supported(self, recipe) -> None:
        """Refuse, by name, a training the pack cannot do on this family yet (before any work is done)."""
        wanted = {recipe.method}
        if getattr(recipe, "mode", "") == "full":
            wanted.add(f"{recipe.method}:full")
        if getattr(recipe, "pivotal_tuning", False):
            wanted.add(f"{recipe.method}:pivotal")
        for what, why in self.not_yet:
            if what in wanted:
                raise ValueError(f"{what.replace(':', ' ')} on {self.label} is not supported yet: {why}")

    def adjust(self, recipe) -> tuple[Any, dict[str, str]]:
        """``recipe`` with the options that mean nothing for this family set to what does, and why, per option
        (asked by ``loop.session.resolve_auto``; the UNet families change nothing)."""
        return recipe, {}

    def learning_rate(self, recipe) -> tuple[float, str]:
        """This family's AdamW rate for ``recipe``'s method (and mode), and where it came from. ``recipe``'s own
        learning_rate is not read: ``loop.session.resolve_auto`` asks this where it is 0 (auto), then scales the rate
        for the adapter kind and the optimizer."""
        return _per_method(self.learning_rates, recipe, self.label)

    def steps(self, recipe, subjects: int = 1) -> tuple[int, str]:
        """The steps of ``recipe``'s method on this family for ``subjects`` subjects, and where they came from (asked
        by ``loop.session.resolve_auto`` where the recipe's steps is 0, auto)."""
        each, why = _per_method(self.train_steps, recipe, self.label)
        return each * subjects, f"{why}: {each} per subject" + (f" x {subjects} subjects" if subjects > 1 else "")

    def batch_size(self, recipe) -> tuple[int, str]:
        """The instance pictures per step of ``recipe``'s method on this family, and where they came from (asked by
        ``loop.session.resolve_auto`` where the recipe's batch_size is 0, auto)."""
        return _per_method(self.train_batch, recipe, self.label)

    def target_modules(self, recipe) -> tuple[str, str]:
        """The target preset of ``recipe``'s method on this family, and where it came from (asked by
        ``loop.session.resolve_auto`` where the recipe's target_modules is "auto")."""
        from ..config.recipes import label_of

        return dict(self.lora_targets)[recipe.method], f"{self.label}, {label_of(recipe.method)}"

    def guidance(self, cfg: float) -> float:
        """``cfg``, or this family's :attr:`sample_cfg` where it is 0 (auto): the guidance a sample or a validation
        picture is drawn at."""
        return float(cfg) if cfg > 0 else self.sample_cfg

    def size_step(self, model) -> int:
        """What every picture side must be a multiple of: the VAE's factor times the UNet's downsamplings."""
        return model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)

    def native_pixels(self, model) -> int:
        """The side of the pictures ``model`` was trained at: its UNet's sample size, else the family's."""
        size = model.unet.config.get("sample_size") if hasattr(model.unet.config, "get") else None
        return int(size) * model.vae_scale_factor if size else self.native_size

    def prediction_type(self, model) -> str:
        """What ``model``'s denoiser predicts (its scheduler config's prediction type for the DDPM families)."""
        return str(model.scheduler_config.get("prediction_type", "epsilon"))

    # --------------------------------------------------------------------------------------- behaviour --
    def encode_prompts(self, model, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, tokens, width) of ``prompts``, as one tensor the loop caches and batches."""
        raise NotImplementedError

    def conditioning(self, model, x: torch.Tensor, context: torch.Tensor,
                     framing: torch.Tensor | None = None) -> dict:
        """The keyword arguments the denoiser (or a ControlNet) takes for :meth:`encode_prompts`' ``context``;
        ``framing`` (B, 6: original height, width, crop top, left, target height, width) says where each picture
        came from, for the families conditioned on it."""
        raise NotImplementedError

    def denoise(self, model, x: torch.Tensor, t, conditioning: dict, **extra) -> torch.Tensor:
        """The denoiser's prediction for latents ``x`` at timesteps ``t``."""
        raise NotImplementedError

    def latent_format(self, model) -> LatentFormat:
        cfg = model.vae.config
        return LatentFormat(float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0))

    def objective(self, model):
        """What training draws and aims at (:mod:`...objectives`)."""
        raise NotImplementedError

    def scheduler(self, model, sampler: str):
        """The diffusers scheduler of sampler ``sampler`` for ``model``."""
        raise NotImplementedError

    def pipeline(self, model):
        """A diffusers pipeline over the model's modules (no copy), for saving a diffusers folder."""
        raise NotImplementedError

    #: kohya's prefix of a LoRA file's module names, per part
    lora_prefixes: ClassVar[dict[str, str]] = {}

    def lora_key(self, model, part: str, module_path: str) -> str:
        """The kohya name of module ``module_path`` of part ``part`` in a LoRA file."""
        raise NotImplementedError


def _per_method(table: tuple[tuple[str, Any], ...], recipe, label: str) -> tuple[Any, str]:
    """``recipe``'s entry of a family's per-method table (its "method:mode" where the table has one, else its
    method's), and the words that say where it came from."""
    from ..config.recipes import label_of

    values, mode = dict(table), getattr(recipe, "mode", "")
    key = f"{recipe.method}:{mode}" if f"{recipe.method}:{mode}" in values else recipe.method
    return values[key], f"{label}, {label_of(recipe.method)}{' ' + mode if key != recipe.method else ''}"
