"""The toy Z-Image's build stages: a 16-channel VAE (``zimage_vae``), then its transformer and Qwen3 text encoder
trained together by flow matching on the toy world (``zimage``), like the toy SD's ``unet`` stage (same pictures,
steps, schedule, EMA and caption dropout), and its quality bar (``zimage_eval``: the judge's colour and shape
accuracy over the base classes, drawn by FlowMatch Euler).

Its folder is a diffusers ZImagePipeline (``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import models, world
from .loader import ZIMAGE_FOLDER as FOLDER
from .steps import encode_pictures, no_build_paths, train_denoiser

log = logging.getLogger(__name__)


def train_zimage(cfg, out: Path, pics: list[world.Picture]) -> dict:
    from diffusers import AutoencoderKL
    from transformers import Qwen2Tokenizer, Qwen3Model

    from ..families.zimage import SCHEDULER_CONFIG
    from ..model.model import FTModel
    from .tokenizer import write_qwen_tokenizer

    torch.manual_seed(cfg.seed + 11)
    g = torch.Generator().manual_seed(cfg.seed + 11)
    dst = out / FOLDER
    tok = Qwen2Tokenizer.from_pretrained(str(write_qwen_tokenizer(dst / "tokenizer")))
    vae = AutoencoderKL.from_pretrained(str(dst / "vae")).eval()
    te = Qwen3Model(models.qwen3_config(len(tok), tok.pad_token_id))
    transformer = models.new_zimage_transformer()
    model = FTModel("toy_zimage", "toy_zimage", transformer, vae, te, tok, dict(SCHEDULER_CONFIG))
    t0 = time.time()
    mean, std = encode_pictures(vae, pics)
    captions = [p.caption for p in pics]
    for m in (transformer, te):
        m.train()

    def condition(idx, drop):
        return model.encode_prompts(["" if d else captions[j] for j, d in zip(idx.tolist(), drop.tolist())])

    def forward(noisy, t, context):
        return model.denoise(noisy, t, context)

    params = list(transformer.parameters()) + list(te.parameters())
    cfg = replace(cfg, unet_steps=cfg.zimage_steps)
    ema_loss, ms = train_denoiser(cfg, params, mean, std, model.latent_format.to_model, model.objective(), g,
                                  condition, forward, "zimage")
    transformer.eval().save_pretrained(str(dst / "transformer"), safe_serialization=True)
    te.eval().save_pretrained(str(dst / "text_encoder"), safe_serialization=True)
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (dst / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, indent=2) + "\n")
    no_build_paths(dst)
    return {"seconds": round(time.time() - t0, 1), "steps": cfg.unet_steps, "ms_per_step": round(ms, 1),
            "final_loss_ema": round(ema_loss, 4)}
