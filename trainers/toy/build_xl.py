"""The toy SDXL's build stage: its UNet and two text encoders trained together on the toy world, on the toy's
VAE latents, like the toy SD's ``unet`` stage (same pictures, steps, schedule, EMA and caption dropout).

The pictures are all 32 x 32 and uncropped, so every time id is (32, 32, 0, 0, 32, 32): the toy learns to use its
pooled embedding and its time-id pathway is present (every test and file sees SDXL's layout) but not trained
towards other sizes.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import diffusion
from . import models, world
from .loader import XL_FOLDER as FOLDER
from .steps import cosine, every, no_build_paths

log = logging.getLogger(__name__)


def train_unet_xl(cfg, out: Path, pics: list[world.Picture]) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..export import legacy_text_encoder_keys
    from ..model import FTModel
    from .tokenizer import write_tokenizer

    torch.manual_seed(cfg.seed + 7)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    dst = out / FOLDER
    for name in ("tokenizer", "tokenizer_2"):
        write_tokenizer(dst / name)
    tok = CLIPTokenizer.from_pretrained(str(dst / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(out / "pipeline" / "vae")).eval()
    te = CLIPTextModel(models.text_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    te2 = CLIPTextModelWithProjection(models.text_config_2(len(tok), tok.bos_token_id, tok.eos_token_id))
    unet = models.new_unet_xl()
    model = FTModel("toy_xl", "toy_xl", unet, vae, te, tok, dict(models.SCHEDULER_CONFIG), text_encoder_2=te2,
                    tokenizer_2=CLIPTokenizer.from_pretrained(str(dst / "tokenizer_2")))
    noise_sched = DDPMScheduler(**models.SCHEDULER_CONFIG)
    t0 = time.time()
    x = world.to_tensor_batch([p.image for p in pics])
    with torch.no_grad():
        dists = [vae.encode(x[i:i + 256]).latent_dist for i in range(0, len(x), 256)]
        mean = torch.cat([d.mean for d in dists]); std = torch.cat([d.std for d in dists])
    sf = vae.config.scaling_factor
    captions = [p.caption for p in pics]
    params = list(unet.parameters()) + list(te.parameters()) + list(te2.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = cosine(opt, cfg.unet_steps, 100)
    ema = EMAModel(params, decay=cfg.ema_decay)
    n = len(pics)
    order = torch.randperm(n, generator=g)
    pos, ema_loss = 0, None
    t1 = time.time()
    for m in (unet, te, te2):
        m.train()
    for i in range(cfg.unet_steps):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + cfg.batch_size]; pos += cfg.batch_size
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        caps = ["" if d else captions[j] for j, d in zip(idx.tolist(), drop.tolist())]
        noise = diffusion.sample_noise(lat, g)
        t = diffusion.sample_timesteps(len(idx), noise_sched, g, lat.device)
        noisy = noise_sched.add_noise(lat, noise, t)
        pred = model.unet_forward(noisy, t, model.encode_prompts(caps))
        w = diffusion.min_snr_weights(noise_sched, t, 5.0)
        loss = diffusion.diffusion_loss(pred, diffusion.target_for(noise_sched, lat, noise, t), weights=w)
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); ema.step(params)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if every(i, 250, cfg.unet_steps):
            el = time.time() - t1
            log.info("xl unet step %d/%d loss(ema) %.4f  %.0f ms/step", i + 1, cfg.unet_steps, ema_loss,
                     1000 * el / (i + 1))
    ema.copy_to(params)
    unet.eval().save_pretrained(str(dst / "unet"), safe_serialization=True)
    te.eval().save_pretrained(str(dst / "text_encoder"), safe_serialization=True)
    legacy_text_encoder_keys(dst / "text_encoder")  # the key layout every other tool (and transformers 4) reads
    te2.eval().save_pretrained(str(dst / "text_encoder_2"), safe_serialization=True)
    DDIMScheduler(**models.SCHEDULER_CONFIG).save_pretrained(str(dst / "scheduler"))
    (dst / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "vae": "../pipeline/vae (the toy's own VAE)",
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2) + "\n")
    no_build_paths(dst)
    return {"seconds": round(time.time() - t0, 1), "steps": cfg.unet_steps,
            "ms_per_step": round(1000 * (time.time() - t1) / cfg.unet_steps, 1), "final_loss_ema": round(ema_loss, 4)}
