"""The SDXL lineage (SDXL and the toy SDXL): two text encoders, a pooled embedding and micro-conditioning.

Its prompt embeddings travel as one tensor like every family's (cached, batched and concatenated for guidance
alike): the two encoders' penultimate hidden states side by side, plus one last row holding the second encoder's
pooled, projected embedding (zero-padded to the row's width). :meth:`SDXL.conditioning` unpacks it and adds the time
ids (original size, crop top-left, target size: a picture's framing). Its LoRA files name the encoders ``lora_te1_``
/ ``lora_te2_`` and the UNet's modules by their original (LDM) block names, as kohya's sd-scripts writes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .ldm import unet_key
from .sd import SD, text_model_path

#: kohya's prefixes of an SDXL LoRA file's module names, per part (sd-scripts, ComfyUI, A1111/Forge and diffusers
#: read these)
PREFIX_XL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@dataclass(frozen=True)
class SDXL(SD):
    """SDXL: CLIP ViT-L and OpenCLIP ViT-bigG, context = both penultimate hidden states + the pooled row."""

    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")

    def encode_prompts(self, model, prompts: list[str]) -> torch.Tensor:
        dev = model.device
        ids = model.tokenize(prompts).to(model.text_encoder.device)
        first = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        ids2 = model.tokenize(prompts, model.tokenizer_2).to(model.text_encoder_2.device)
        out2 = model.text_encoder_2(ids2, output_hidden_states=True)
        hidden = torch.cat([first.to(dev), out2.hidden_states[-2].to(dev)], dim=-1)
        pooled = out2.text_embeds.to(dev, hidden.dtype)
        row = torch.nn.functional.pad(pooled, (0, hidden.shape[-1] - pooled.shape[-1]))
        return torch.cat([hidden, row[:, None]], dim=1)

    def conditioning(self, model, x, context, framing=None) -> dict:
        """The pooled row is split off into ``added_cond_kwargs`` with the time ids: the pictures' framing
        (original h, w, crop top, left, target h, w), by default whole pictures of the latents' own size."""
        hidden, pooled = context[:, :-1], context[:, -1, :self.pooled_dim(model)]
        time_ids = model.whole_framing(x) if framing is None else framing
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(x.device, hidden.dtype)}}

    @staticmethod
    def pooled_dim(model) -> int:
        """The width of the pooled text embedding (the second encoder's projection)."""
        return int(model.text_encoder_2.config.projection_dim)

    def pipeline(self, model):
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
            scheduler=DDIMScheduler.from_config(model.scheduler_config))

    lora_prefixes: ClassVar[dict[str, str]] = PREFIX_XL

    def lora_key(self, model, part: str, module_path: str) -> str:
        module_path = text_model_path(part, module_path)
        if part == "unet":
            cfg = model.unet.config
            module_path = unet_key(module_path + ".weight", cfg.layers_per_block,
                                   ["CrossAttn" in t for t in cfg.up_block_types])[:-len(".weight")]
        return PREFIX_XL[part] + module_path.replace(".", "_")
