"""Flow matching (rectified flow), as the flow transformers are trained (SD3, Flux, Z-Image): a noise level sigma in
(0, 1) drawn from a density and shifted toward noise, ``x_t = (1 - sigma) * x0 + sigma * noise``, and the target the
velocity ``noise - x0``. Timesteps are the scheduler's, ``sigma * 1000``; a family whose model runs time the other
way (Z-Image) turns them around in its ``denoise``.

The densities are SD3's (Esser et al. 2024, section 3.1: logit-normal with mean 0 and std 1, or uniform), the shift
is the scheduler's (``shift * s / (1 + (shift - 1) * s)``, 3 for Z-Image and SD3), and the loss weights SD3's
(none, ``sigma_sqrt``: 1 / sigma^2, ``cosmap``); the formulas are diffusers' ``compute_density_for_timestep_sampling``
and ``compute_loss_weighting_for_sd3``, written with the run's own generator.
"""
from __future__ import annotations

import math

import torch

from .base import Objective, randn, sample_noise

DENSITIES = ("logit_normal", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's shift of noise levels ``s`` toward noise (shift 1: unchanged)."""
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(n: int, generator: torch.Generator, density: str = "logit_normal", shift: float = 1.0,
                  shard=None) -> torch.Tensor:
    """``n`` noise levels in (0, 1) from ``density``, shifted (float32, CPU); a distributed run's rank draws the
    whole global batch and keeps its rows, like :func:`~.base.randn`."""
    if density == "logit_normal":
        u = torch.sigmoid(randn((n,), generator, shard))
    elif density == "uniform":
        world = 1 if shard is None else shard.world
        u = torch.rand((n * world,), generator=generator)
        u = u if world == 1 else shard.take(u)
    else:
        raise ValueError(f"timestep density {density!r} is not known: choose one of {', '.join(DENSITIES)}")
    return shifted(u, shift)


def loss_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor | None:
    if weighting == "none":
        return None
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ValueError(f"loss weighting {weighting!r} is not known: choose one of {', '.join(WEIGHTINGS)}")


class FlowMatching(Objective):
    """A flow model's objective: noise levels from ``density``, shifted by ``shift``; weights by ``weighting``."""

    def __init__(self, shift: float = 3.0, density: str = "logit_normal", weighting: str = "none"):
        if density not in DENSITIES:
            raise ValueError(f"timestep density {density!r} is not known: choose one of {', '.join(DENSITIES)}")
        loss_weights(torch.ones(1), weighting)  # a bad name fails here, before the first step
        self.shift, self.density, self.weighting = shift, density, weighting

    def noised(self, latents, g, noise_offset=0.0, shard=None):
        noise = sample_noise(latents, g, noise_offset, shard=shard)
        s = sample_sigmas(len(latents), g, self.density, self.shift, shard).to(latents.device)
        b = s.to(latents.dtype).reshape(-1, *[1] * (latents.ndim - 1))
        return (1 - b) * latents + b * noise, s * 1000.0, noise - latents

    def weights(self, t, cfg):
        return loss_weights(t.float() / 1000.0, self.weighting)
