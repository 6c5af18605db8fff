"""DDPM training, as Stable Diffusion was trained: integer timesteps drawn uniformly, noise added by the scheduler's
alphas, the target the noise (epsilon) or the velocity (v-prediction), and min-SNR-gamma loss weights."""
from __future__ import annotations

import torch

from .base import Objective, sample_noise


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


class DDPM(Objective):
    """The UNet families' objective, from the model's scheduler config (its prediction type and betas)."""

    def __init__(self, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)

    def noised(self, latents, g, noise_offset=0.0, shard=None):
        noise = sample_noise(latents, g, noise_offset, shard=shard)
        t = sample_timesteps(latents.shape[0], self.scheduler, g, latents.device, shard=shard)
        return self.scheduler.add_noise(latents, noise, t), t, target_for(self.scheduler, latents, noise, t)

    def weights(self, t, cfg):
        return min_snr_weights(self.scheduler, t, cfg.snr_gamma) if cfg.snr_gamma else None
