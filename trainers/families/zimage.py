"""The Z-Image lineage (Z-Image Base and Turbo, and the toy Z-Image): a single-stream flow-matching transformer
(diffusers' ``ZImageTransformer2DModel``, ComfyUI's Lumina2 ``NextDiT`` at width 3840) over 16-channel latents of
the Flux VAE, conditioned on one Qwen3 text encoder.

What differs from the UNet families, and lives here:

- **Prompts** are wrapped in Qwen's chat template exactly as ComfyUI writes it (``ZImageTokenizer.llama_template``;
  diffusers gets the same string from Qwen3's own chat template with thinking on), and the context is the
  second-to-last hidden state of the prompt's own tokens, without padding. The pack's prompt embeddings travel as
  one tensor (cached, batched, concatenated for guidance): the rows padded with zeros to the tokenizer's length,
  plus one last row whose first value is how many rows are the prompt's. :meth:`ZImage.conditioning` cuts each
  prompt back to its own rows, the list the transformer takes.
- **The denoiser** takes lists (one (C, 1, H, W) latent and one (tokens, width) context per picture) and a time
  running the other way: the model sees ``(1000 - t) / 1000`` and predicts ``x0 - noise``. :meth:`ZImage.denoise`
  answers in the scheduler's terms (t = sigma x 1000, the prediction ``noise - x0``), as diffusers' pipeline and
  ComfyUI's ``NextDiT`` (``t = 1 - timesteps``, ``return -img``) both do.
- **Training** is flow matching (:mod:`..objectives.flow`), **sampling** FlowMatch Euler with the family's shift on
  diffusers' Z-Image schedule (sigmas from 1 to 1/steps, shifted).
- **LoRA files** name the transformer's modules ``diffusion_model.<diffusers path>`` (ai-toolkit's format, which
  ComfyUI 0.8 maps onto its fused layers) and the text encoder's ``text_encoders.qwen3_4b.transformer.model.<path>``,
  with the pack's kohya suffixes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Family

#: Z-Image's prompt template: ComfyUI's ZImageTokenizer.llama_template, and what diffusers' pipeline gets from Qwen3's
#: chat template (a user turn, then the assistant's turn opened, thinking on: no empty think block)
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: Z-Image's scheduler (ComfyUI's ZImage.sampling_settings, diffusers' FlowMatchEulerDiscreteScheduler config)
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": False}
#: sampler name -> what draws it; FlowMatch Euler is the sampler Z-Image's pipeline and ComfyUI's workflows use
SAMPLERS = ("euler",)
#: the prefixes of a Z-Image LoRA file's module names, per part: the transformer's diffusers paths under
#: ``diffusion_model.`` (ai-toolkit's), the Qwen3's transformers paths under ComfyUI's own name for its weights
#: (``text_encoders.<the CLIP's state-dict key>``, the generic text-encoder form ComfyUI's LoRA loader reads)
PREFIX = {"transformer": "diffusion_model.", "text_encoder": "text_encoders.qwen3_4b.transformer.model."}
#: a whole Z-Image checkpoint as ComfyUI's CheckpointSave writes one (and CheckpointLoaderSimple reads it): the
#: transformer in its native layout, the Qwen3 under CLIP's own name (transformers' names), the VAE
CHECKPOINT = {"transformer": "model.diffusion_model.", "text_encoder": "text_encoders.qwen3_4b.transformer.model.",
              "vae": "vae."}


def flow_scheduler(config: dict):
    """diffusers' FlowMatch Euler on Z-Image's schedule: ``set_timesteps(n)`` gives sigmas linspace(1, 1/n, n),
    shifted by the config's shift (diffusers' ``get_default_z_image_sigmas``; the pipeline's ``mu`` is unused
    without dynamic shifting), and the loop's DDPM-family calls (``init_noise_sigma``, ``scale_model_input``) are the
    identity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class ZImageEuler(FlowMatchEulerDiscreteScheduler):
        init_noise_sigma = 1.0

        def scale_model_input(self, sample, timestep=None):
            return sample

        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            n = int(num_inference_steps)
            super().set_timesteps(sigmas=torch.linspace(1.0, 1.0 / n, n).tolist(), device=device, **kw)

    return ZImageEuler.from_config({k: v for k, v in config.items() if not k.startswith("_")
                                    and k != "prediction_type"})


@dataclass(frozen=True)
class ZImage(Family):
    """Z-Image: one Qwen3 encoder (context = its second-to-last hidden state), a list-based flow transformer."""

    #: the flow's shift of the timestep density and of the sampling schedule
    shift: float = 3.0
    #: the most prompt tokens (template included) the encoder reads; diffusers' pipeline reads 512
    max_tokens: int = 512

    denoiser_part: ClassVar[str] = "transformer"
    default_sampler: ClassVar[str] = "euler"
    sampler_label: ClassVar[str] = "FlowMatch Euler"
    checkpoint_parts: ClassVar[dict[str, str]] = CHECKPOINT
    comfy_class: ClassVar[str] = "ZImage"

    # ----------------------------------------------------------------------------------------- prompts --
    def encode_prompts(self, model, prompts: list[str]) -> torch.Tensor:
        tok, te = model.tokenizer, model.text_encoder
        texts = [TEMPLATE.format(model.expand_tokens(p)) for p in prompts]
        # the encoder reads the longest prompt's tokens only (its attention is causal: a prompt's rows do not depend
        # on the padding after them), and the rows are padded to one length after it, for the cache and batches
        enc = tok(texts, padding="longest", padding_side="right", max_length=self.max_tokens, truncation=True,
                  return_tensors="pt")
        ids, mask = enc.input_ids.to(te.device), enc.attention_mask.to(te.device)
        hidden = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        hidden = hidden.to(model.device) * mask.to(model.device, hidden.dtype)[..., None]
        out = hidden.new_zeros(len(prompts), self.max_tokens + 1, hidden.shape[-1])
        out[:, :hidden.shape[1]] = hidden
        out[:, -1, 0] = mask.sum(1).to(hidden.device, hidden.dtype)  # the last row counts the prompt's own rows
        return out

    @staticmethod
    def prompt_rows(context: torch.Tensor) -> list[torch.Tensor]:
        """Each prompt's own rows of a context :meth:`encode_prompts` made (its last row counts them)."""
        counts = context[:, -1, 0].round().long().tolist()
        return [c[:n] for c, n in zip(context[:, :-1], counts)]

    def conditioning(self, model, x, context, framing=None) -> dict:
        return {"cap_feats": self.prompt_rows(context)}

    # ------------------------------------------------------------------------------------------ denoise --
    def denoise(self, model, x, t, conditioning: dict, **extra) -> torch.Tensor:
        """The prediction ``noise - x0`` for latents ``x`` (B, C, H, W) at scheduler timesteps ``t`` (sigma x
        1000): the transformer sees ``(1000 - t) / 1000`` and predicts ``x0 - noise``."""
        if extra:
            raise ValueError(f"{self.label} takes no {', '.join(extra)} (ControlNet residuals are a UNet's)")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(len(x))
        out = model.transformer(list(x.unsqueeze(2).unbind(0)), (1000.0 - t) / 1000.0,
                                conditioning["cap_feats"], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def adjust(self, recipe):
        """Min-SNR weights a DDPM schedule's noise levels; flow matching draws its own from a density, so
        snr_gamma is set to 0 (noise_offset still offsets the noise a flow is drawn toward, as ai-toolkit applies
        it)."""
        from dataclasses import replace

        if getattr(recipe, "snr_gamma", 0):
            return replace(recipe, snr_gamma=0.0), {
                "snr_gamma": f"0 for {self.label}: min-SNR weights a DDPM schedule's noise levels, and a flow-matching "
                             "model's noise levels come from its timestep density (not applied)"}
        return recipe, {}

    def objective(self, model):
        from ..objectives.flow import FlowMatching

        return FlowMatching(shift=float(model.scheduler_config.get("shift", self.shift)))

    def scheduler(self, model, sampler: str):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} does not draw {self.label} (a flow-matching model): choose "
                             f"{' or '.join(SAMPLERS)} (FlowMatch Euler, shift {self.shift:g})")
        return flow_scheduler(model.scheduler_config)

    def pipeline(self, model):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(config), vae=model.vae,
                              text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                              transformer=model.transformer)

    # ------------------------------------------------------------------------------------------- shapes --
    def size_step(self, model) -> int:
        """Picture sides are multiples of the VAE's factor times the transformer's patch (2)."""
        return model.vae_scale_factor * int(model.transformer.config.all_patch_size[0])

    def prediction_type(self, model) -> str:
        return "flow"

    lora_prefixes: ClassVar[dict[str, str]] = PREFIX

    def lora_key(self, model, part: str, module_path: str) -> str:
        return PREFIX[part] + module_path
