"""The Stable Diffusion lineage (SD 1.x, SD 2.x and the toy): a UNet over 4-channel latents, one CLIP text encoder
whose last hidden state is the cross-attention context, DDPM training (epsilon or v-prediction) and diffusers'
DDPM-family samplers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Family

#: sampler name -> (diffusers scheduler class, extra config). Node combos list these keys.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
#: kohya's prefixes of a LoRA file's module names, per part
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def make_scheduler(scheduler_config: dict, sampler: str):
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not known; choose one of: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[sampler]
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config(cfg, **extra)


def text_model_path(part: str, module_path: str) -> str:
    """Text-encoder paths spelled as transformers 4 named them (``text_model.encoder.layers...``): transformers 5
    dropped the ``text_model`` level, the file formats did not."""
    if part.startswith("text_encoder") and not module_path.startswith("text_model."):
        return "text_model." + module_path
    return module_path


def sd_lora_key(part: str, module_path: str) -> str:
    """The kohya name of an SD 1.x / 2.x module (``lora_unet_<diffusers path>``, ``lora_te_text_model_...``)."""
    return PREFIX[part] + text_model_path(part, module_path).replace(".", "_")


@dataclass(frozen=True)
class SD(Family):
    """SD 1.x / 2.x and the toy: one CLIP encoder, context = its last hidden state."""

    def encode_prompts(self, model, prompts: list[str]) -> torch.Tensor:
        ids = model.tokenize(prompts).to(model.text_encoder.device)
        return model.text_encoder(ids)[0].to(model.device)

    def conditioning(self, model, x, context, framing=None) -> dict:
        return {"encoder_hidden_states": context}

    def denoise(self, model, x, t, conditioning: dict, **extra) -> torch.Tensor:
        return model.unet(x, t, **conditioning, **extra).sample

    def objective(self, model):
        from ..objectives.ddpm import DDPM

        return DDPM(model.scheduler_config)

    def scheduler(self, model, sampler: str):
        return make_scheduler(model.scheduler_config, sampler)

    def pipeline(self, model):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
            scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)

    lora_prefixes: ClassVar[dict[str, str]] = PREFIX

    def lora_key(self, model, part: str, module_path: str) -> str:
        return sd_lora_key(part, module_path)
