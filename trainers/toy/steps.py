"""What the toy build's stages share: the learning-rate schedule, when to log, and clean shipped configs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def cosine(opt, steps: int, warmup: int, floor: float = 0.1):
    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        p = (i - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def every(i: int, n: int, total: int) -> bool:
    return (i + 1) % n == 0 or i + 1 == total


def no_build_paths(folder: Path) -> None:
    """No build-machine paths in shipped files: drop ``_name_or_path`` from every component's config."""
    for cfg_file in folder.glob("*/config.json"):
        cfg_json = json.loads(cfg_file.read_text())
        if cfg_json.pop("_name_or_path", None) is not None:
            cfg_file.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")


def encode_pictures(vae, pics) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std of every toy picture (the builds draw a latent from them each step)."""
    from . import world

    x = world.to_tensor_batch([p.image for p in pics])
    with torch.no_grad():
        dists = [vae.encode(x[i:i + 256]).latent_dist for i in range(0, len(x), 256)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def fit_vae(vae, next_batch, cfg, label: str) -> None:
    """The toy builds' VAE training: ``cfg.vae_steps`` AdamW steps (cosine schedule, gradient clipping) of MSE +
    0.5 L1 reconstruction and a ``cfg.vae_kl`` KL term on ``next_batch()`` (pictures in [-1, 1]); leaves it in eval
    mode."""
    import logging

    import torch.nn.functional as F

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    sched = cosine(opt, cfg.vae_steps, 50)
    for i in range(cfg.vae_steps):
        x = next_batch()
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
        opt.step()
        sched.step()
        if every(i, 100, cfg.vae_steps):
            logging.getLogger(__name__).info("%s step %d/%d loss %.4f", label, i + 1, cfg.vae_steps, loss.item())
    vae.eval()


def train_denoiser(cfg, params: list, mean: torch.Tensor, std: torch.Tensor, to_model, objective,
                   g: torch.Generator, condition, forward, label: str) -> tuple[float, float]:
    """The toy builds' text-to-image training: ``cfg.unet_steps`` AdamW steps (cosine schedule, EMA, gradient
    clipping, the ``objective``'s weights at min-SNR 5) over shuffled batches of the latents (``to_model``: VAE
    latents -> the denoiser's), a caption dropped with ``cfg.caption_dropout``. ``condition(idx, dropped)`` gives
    the batch's text conditioning and ``forward(noisy, t, conditioning)`` the prediction. The averaged weights end
    in ``params``; returns the final smoothed loss and the milliseconds per step."""
    import logging
    import time
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from ..objectives import base

    log = logging.getLogger(__name__)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = cosine(opt, cfg.unet_steps, 100)
    ema = EMAModel(params, decay=cfg.ema_decay)
    n = len(mean)
    order = torch.randperm(n, generator=g)
    pos, ema_loss = 0, None
    t1 = time.time()
    for i in range(cfg.unet_steps):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        lat = to_model(mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        noisy, t, target = objective.noised(lat, g)
        pred = forward(noisy, t, condition(idx, drop))
        loss = base.diffusion_loss(pred, target, weights=objective.weights(t, SimpleNamespace(snr_gamma=5.0)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if every(i, 250, cfg.unet_steps):
            log.info("%s step %d/%d loss(ema) %.4f  %.0f ms/step", label, i + 1, cfg.unet_steps, ema_loss,
                     1000 * (time.time() - t1) / (i + 1))
    ema.copy_to(params)
    return ema_loss, 1000 * (time.time() - t1) / cfg.unet_steps
