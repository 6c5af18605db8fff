"""What a training step draws and aims at, the seam between a family and the loop: an :class:`Objective` noises a
batch of latents (its noise and timesteps drawn from the run's generator) and says the target of the prediction and
each sample's loss weight. A family picks its objective (``Family.objective``): DDPM (epsilon or v-prediction, with
min-SNR weights) for the UNet families; a flow-matching objective joins it here.

Pure torch. Every random draw takes an explicit ``torch.Generator`` so runs repeat; with a ``shard`` of a distributed
run each rank draws the whole global batch and keeps its rows.
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


class Objective:
    """The training math of one family: :meth:`noised` draws a batch's noise and timesteps and gives (noisy latents,
    timesteps, target); :meth:`weights` gives each sample's loss weight (None: all alike)."""

    def noised(self, latents: torch.Tensor, g: torch.Generator, noise_offset: float = 0.0,
               shard=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def weights(self, t: torch.Tensor, cfg) -> torch.Tensor | None:
        return None
