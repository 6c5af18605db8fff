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

from . import models, world
from .loader import XL_FOLDER as FOLDER
from .steps import encode_pictures, no_build_paths, train_denoiser

log = logging.getLogger(__name__)


def train_unet_xl(cfg, out: Path, pics: list[world.Picture]) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..runs.export import legacy_text_encoder_keys
    from ..model.model import FTModel
    from ..objectives.ddpm import DDPM
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
    t0 = time.time()
    mean, std = encode_pictures(vae, pics)
    captions = [p.caption for p in pics]
    for m in (unet, te, te2):
        m.train()

    def condition(idx, drop):
        return model.encode_prompts(["" if d else captions[j] for j, d in zip(idx.tolist(), drop.tolist())])

    params = list(unet.parameters()) + list(te.parameters()) + list(te2.parameters())
    ema_loss, ms = train_denoiser(cfg, params, mean, std, lambda z: z * vae.config.scaling_factor,
                                  DDPM(models.SCHEDULER_CONFIG), g, condition,
                                  model.denoise, "xl unet")
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
    return {"seconds": round(time.time() - t0, 1), "steps": cfg.unet_steps, "ms_per_step": round(ms, 1),
            "final_loss_ema": round(ema_loss, 4)}
