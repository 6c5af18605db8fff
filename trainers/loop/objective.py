"""Diffusion training math shared by every trainer: noise, timesteps, targets, loss weights.

Pure torch + diffusers schedulers. Every random draw takes an explicit ``torch.Generator`` so runs repeat.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def randn(shape, generator: torch.Generator, shard=None) -> torch.Tensor:
    """Standard normal draws of ``shape`` (float32, CPU). With a ``shard`` of a distributed run, the draw is for the
    whole global batch (``world × shape[0]`` rows) and this rank's rows are returned, so every rank's draws are the
    rows one process would have drawn."""
    if shard is None or shard.world == 1:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    full = torch.randn((shape[0] * shard.world, *shape[1:]), generator=generator, dtype=torch.float32)
    return shard.take(full)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0,
                 shard=None) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant (brighter/darker images)."""
    noise = randn(latents.shape, generator, shard).to(latents.device, latents.dtype)
    if noise_offset:
        off = randn((latents.shape[0], latents.shape[1], 1, 1), generator, shard)
        noise = noise + noise_offset * off.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(n: int, scheduler, generator: torch.Generator, device, shard=None) -> torch.Tensor:
    num = scheduler.config.num_train_timesteps
    world = 1 if shard is None else shard.world
    t = torch.randint(0, num, (n * world,), generator=generator)
    return (t if world == 1 else shard.take(t)).to(device=device, dtype=torch.long)


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps``."""
    ac = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ac / (1.0 - ac).clamp_min(1e-12)


def target_for(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon), or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config: expected epsilon, "
                     "v_prediction or sample")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the scheduler's prediction type.

    epsilon: min(snr, g) / snr;  v-prediction: min(snr, g) / (snr + 1), using snr + 1 in the numerator's min so a
    zero-terminal-SNR schedule (snr = 0 at the last step) still gets a non-zero weight there.
    """
    s = snr(scheduler, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return torch.minimum(s + 1.0, torch.full_like(s, gamma)) / (s + 1.0)
    if kind == "epsilon":
        return torch.minimum(s, torch.full_like(s, gamma)) / s.clamp_min(1e-8)
    return torch.ones_like(s)


def diffusion_loss(pred, target, *, weights=None, loss_type: str = "mse", huber_delta: float = 0.1,
                   pixel_weights=None):
    """Per-sample loss (mean over all but the batch dimension, or the ``pixel_weights``-weighted mean: a masked
    loss), weighted per sample, then averaged."""
    if loss_type == "mse":
        per = F.mse_loss(pred.float(), target.float(), reduction="none")
    elif loss_type == "huber":
        per = F.huber_loss(pred.float(), target.float(), reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected 'mse' or 'huber'")
    if pixel_weights is not None:
        from ..data.masks import weighted_mean

        per = weighted_mean(per, pixel_weights)
    else:
        per = per.mean(dim=tuple(range(1, per.ndim)))
    if weights is not None:
        per = per * weights
    return per.mean()
