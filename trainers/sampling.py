"""Text-to-image sampling with classifier-free guidance over an :class:`FTModel`.

One explicit loop instead of a pipeline call so that progress, cancel and per-image seeds are ours: image ``i`` of
a batch uses seed ``seed + i``, so it is the same picture whether it was made alone or in a batch.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch

from .families.sd import SAMPLERS  # noqa: F401  (the samplers the nodes list: the UNet families')
from .model.deltas import cached
from .model.model import vae_chunk

log = logging.getLogger(__name__)

class Cancelled(Exception):
    """Raised inside a loop when its ``should_stop`` callback says so."""


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per image, so noise is identical on every device and in any batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def check_size(model, width: int, height: int) -> tuple[int, int]:
    width = width or model.native_size
    height = height or model.native_size
    mult = model.size_step
    for name, v in (("width", width), ("height", height)):
        if v % mult:
            raise ValueError(f"{name} {v} is not a multiple of {mult}, which this model needs "
                             f"(try {max(mult, round(v / mult) * mult)})")
    return width, height


@torch.no_grad()
@cached()  # a live-applied LoRA's weights are computed once per call, not at every step
def sample(
    model,
    prompts: list[str] | str,
    *,
    seeds: list[int],
    negative_prompt: str = "",
    steps: int = 20,
    cfg: float = 0.0,
    sampler: str = "",
    width: int = 0,
    height: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    controls=(),
    resize_mode: str = "crop",
) -> torch.Tensor:
    """Generate ``len(seeds)`` images; returns a ComfyUI IMAGE tensor (B, H, W, 3), float 0..1, on the CPU.

    ``cfg`` 0 (auto) is the model's own guidance (:meth:`.FTModel.guidance`: its family's, Z-Image Turbo's 1).
    ``controls`` are :class:`~.control.Control` applications; their residuals are summed and added to the UNet's
    skip connections on both halves of classifier-free guidance. Strength 0 skips a ControlNet entirely.

    An offloaded model's parts visit its device a stage at a time and leave it after (:meth:`FTModel.placed`): the
    text encoders for the prompts, the UNet (and the ControlNets) for the denoising, the VAE for the decoding. An
    SDXL at 1024 px never has its UNet and its VAE's decoding on the GPU together (benchmarks/sdxl_memory.py).
    """
    if isinstance(prompts, str):
        prompts = [prompts] * len(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds: give one prompt, or one per image")
    width, height = check_size(model, width, height)
    sampler = model.family.default_sampler if sampler in ("", "auto") else sampler
    cfg = model.guidance(cfg)  # 0: the model's own (its family's, Z-Image Turbo's 1)
    use_cfg = cfg != 1.0
    try:
        with torch.no_grad(), model.placed(model.text_parts) as here, cached():
            cond = here.encode_prompts(list(prompts)).to(here.dtype)
            if use_cfg:
                uncond = here.encode_prompts([negative_prompt] * len(seeds)).to(here.dtype)
                cond = torch.cat([uncond, cond])
        with model.placed((model.family.denoiser_part,)) as here:
            latents = denoise(here, cond, seeds, steps, cfg, sampler, width, height, on_step, should_stop, controls,
                              resize_mode)
        with model.placed(("vae",)) as here:
            return decode(here, latents)
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(memory_advice(model, len(seeds), width, height)) from e


def sample_in_chunks(model, prompt: str, seeds: list[int], chunk: int, **kw) -> Iterator[torch.Tensor]:
    """:func:`sample` of ``seeds``, ``chunk`` at a time (each batch as it is made), halving the chunk when the GPU
    runs out of memory: the same pictures, as each has its own seed, only fewer at once (DreamBooth's class
    pictures). One at a time out of memory raises :func:`sample`'s advice."""
    start = 0
    while start < len(seeds):
        part = seeds[start:start + chunk]
        try:
            imgs = sample(model, prompt, seeds=part, **kw)
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            imgs = None
        if imgs is None:  # out of the except block: the failed call's tensors are free to be returned
            chunk //= 2
            torch.cuda.empty_cache()
            log.info("out of GPU memory sampling %d pictures at once: %d at a time now", len(part), chunk)
            continue
        start += len(part)
        yield imgs


def memory_advice(model, count: int, width: int, height: int) -> str:
    """What to lower when sampling runs out of GPU memory, from the call's own size."""
    fixes = [f"make fewer at once (a smaller batch than {count})" if count > 1 else None,
             f"a smaller size than {width} x {height} (the model's native size is {model.native_size} px)"
             if max(width, height) > model.native_size // 2 else None,
             "load the model with offload auto, so only the part at work is on the GPU" if not model.offload else None,
             "free the GPU of ComfyUI's own models first (the front end's Unload Models command)"]
    return (f"out of GPU memory sampling {count} picture{'s' if count > 1 else ''} at {width} x {height} px: "
            + "; or ".join(f for f in fixes if f))


@torch.no_grad()
@cached()  # a live-applied LoRA's weights are computed once per call, not at every step
def denoise(model, context, seeds, steps, cfg, sampler, width, height, on_step, should_stop, controls,
            resize_mode) -> torch.Tensor:
    """The latents :func:`sample` decodes: ``context`` holds the negative prompts' rows first when ``cfg`` != 1."""
    use_cfg = cfg != 1.0
    scheduler = model.family.scheduler(model, sampler)
    scheduler.set_timesteps(steps, device=model.device)
    dev, dt = model.device, model.dtype
    context = context.to(dev)
    f = model.vae_scale_factor
    prepared = []
    if controls:
        from .adapters.controlnet.apply import prepare_controls, residuals

        prepared = prepare_controls(controls, model, len(seeds), height, width, resize_mode, use_cfg)
    latents = initial_noise(seeds, (model.latent_channels, height // f, width // f)).to(dev, dt)
    latents = latents * scheduler.init_noise_sigma
    gens = [torch.Generator("cpu").manual_seed(int(s) + 1_000_003) for s in seeds]
    step_kwargs = {"generator": gens} if "generator" in scheduler.step.__code__.co_varnames else {}
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"sampling cancelled at step {i} of {total}")
        x = torch.cat([latents, latents]) if use_cfg else latents
        x = scheduler.scale_model_input(x, t)
        kw = model.conditioning(x, context)
        if prepared:
            down, mid = residuals(prepared, x, t, kw, i, total)
            pred = model.denoise(x, t, conditioning=kw, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid)
        else:
            pred = model.denoise(x, t, conditioning=kw)
        if use_cfg:
            p_u, p_c = pred.chunk(2)
            pred = p_u + cfg * (p_c - p_u)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        if on_step is not None:
            on_step(i + 1, total)
    return latents


@torch.no_grad()
def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """Pictures (B, H, W, 3) on the CPU from latents, decoded a few at a time (:func:`~.model.vae_chunk`: the
    decoder's activations grow with the pixels of one call, so a batch at 1024 px goes one picture at a time). The VAE
    runs in its own dtype even under a training's autocast (validation pictures): SDXL's overflows in fp16."""
    f = model.vae_scale_factor
    n = vae_chunk(latents.shape[-2] * f, latents.shape[-1] * f, most=len(latents))
    out = []
    for part in latents.split(n):
        with torch.autocast(part.device.type, enabled=False):
            img = model.vae.decode(model.latent_format.to_vae(part).to(model.vae.dtype)).sample
        out.append((img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).contiguous()
