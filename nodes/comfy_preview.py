"""Validation pictures drawn by ComfyUI itself: what you see while training is what ComfyUI then draws.

Inside ComfyUI a training node's validation pictures can come from ComfyUI's own path instead of the pack's
sampler: the base model as ComfyUI's MODEL / CLIP / VAE (:func:`.bridges.to_comfy`, built once per run, in the
model's precision, as Model to ComfyUI gives it), what is training handed over as the file a save node would write
(a LoRA's kohya state dict through ``comfy.sd.load_lora_for_models``, the function LoraLoader calls; an embedding
as a file ComfyUI's tokenizer reads for ``embedding:<name>``; a ControlNet as Save ControlNet's file applied by
Apply ControlNet (Advanced) on the run's validation condition; a full fine-tune's whole model again), ComfyUI's
CLIPTextEncode, its sampler and scheduler by name (KSampler's ``comfy.sample`` calls, one picture per seed as
KSampler at that seed) and its VAE Decode. So a preview equals what Save LoRA -> LoraLoader -> KSampler -> VAE
Decode give at the same seed, sampler, scheduler, steps and cfg (tests/test_comfyui_bridges.py), and keep_best
scores the pictures users will get.

:func:`drawer` decides, once per run, whether ComfyUI draws (``validation_sampler``: auto, comfyui, pack) and
says why not where it cannot: outside ComfyUI, or a model ComfyUI has no equivalent of (the toys). Then the pack's
sampler draws, as before.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path

from . import host

#: the name a run's embedding has in its private embeddings folder while ComfyUI draws (never a file users see)
PREVIEW_EMBEDDING = "ft_preview"


def pieces(method) -> dict | None:
    """What a training method hands ComfyUI for a preview: ``lora`` (a LoRA method), ``ti`` (a Textual Inversion
    method), ``full`` (every weight of the model), ``controlnet`` (a ControlNet method); None for another."""
    from ..trainers.methods.controlnet import ControlNetMethod
    from ..trainers.methods.dreambooth import DreamBoothMethod, FullMethod, PivotalMethod
    from ..trainers.methods.lora import LoRAMethod
    from ..trainers.methods.textual_inversion import TextualInversionMethod

    if isinstance(method, DreamBoothMethod):
        return pieces(method.inner)
    if isinstance(method, PivotalMethod):
        return {"lora": method.lora, "ti": method.ti}
    if isinstance(method, LoRAMethod):
        return {"lora": method}
    if isinstance(method, TextualInversionMethod):
        return {"ti": method}
    if isinstance(method, FullMethod):
        return {"full": True}
    if isinstance(method, ControlNetMethod):
        return {"controlnet": method}
    return None


def why_not(model, recipe) -> str:
    """Why ComfyUI cannot draw this run's validation pictures ("" when it can), from the node's inputs alone."""
    if not host.in_comfyui():
        return "outside ComfyUI"
    if not model.family.config:
        return f"ComfyUI has no model like the {model.family.label}"
    if not model.family.text_encoder_files:  # Model to ComfyUI takes it; a preview's copy would join the training one
        return (f"ComfyUI does not draw {model.family.label} previews yet (its copy of the model, 20 GB in bf16, "
                "would sit beside the one training)")
    import comfy.samplers

    for name, value, known in (("validation_sampler_name", recipe.validation_sampler_name,
                                comfy.samplers.KSampler.SAMPLERS),
                               ("validation_scheduler", recipe.validation_scheduler,
                                comfy.samplers.KSampler.SCHEDULERS)):
        if value not in known:
            return f"this ComfyUI has no {name} {value!r}"
    return ""


def drawer(model, recipe) -> "ComfyPreview | None":
    """The run's ComfyUI drawer, or None when the pack's sampler draws; the log says which and why."""
    if not (recipe.validation_prompt.strip() and recipe.validation_every) and recipe.keep_best == "off":
        return None
    recipe = replace(recipe, validation_cfg=model.guidance(recipe.validation_cfg))  # 0: the model's own
    settings = (f"{recipe.validation_steps} steps, cfg {recipe.validation_cfg:g}, seeds {recipe.seed}.."
                f"{recipe.seed + recipe.validation_images - 1}")
    if recipe.validation_sampler == "pack":
        host.log.info("validation pictures: the pack's sampler (%s, %s), as validation_sampler asks",
                      model.family.sampler_label, settings)
        return None
    reason = why_not(model, recipe)
    if reason:
        level = host.log.warning if recipe.validation_sampler == "comfyui" else host.log.info
        level("validation pictures: the pack's sampler (%s, %s), not ComfyUI's: %s", model.family.sampler_label,
              settings, reason)
        return None
    host.log.info("validation pictures: ComfyUI's sampler (%s, %s, %s)", recipe.validation_sampler_name,
                  recipe.validation_scheduler, settings)
    return ComfyPreview(model, recipe)


def embedding_prompt(prompt: str, token: str) -> str:
    """The prompt as a ComfyUI user writes it: the trained word as ``embedding:<name>``."""
    return re.sub(rf"(?<![\w:]){re.escape(token)}(?!\w)", f"embedding:{PREVIEW_EMBEDDING}", prompt)


class ComfyPreview:
    """Draws one run's validation pictures with ComfyUI (``draw`` of the loop's callbacks); :meth:`close` at the
    run's end lets ComfyUI's copy of the model go."""

    def __init__(self, base, recipe):
        self.base, self.recipe = base, recipe
        self.comfy = None  # (MODEL, CLIP, VAE) of the base, built at the first picture
        self.folder = tempfile.TemporaryDirectory(prefix="ft-preview-")  # the embedding as ComfyUI reads it

    def close(self) -> None:
        self.comfy = None
        self.folder.cleanup()

    def _model(self, model, parts: dict):
        """ComfyUI's (MODEL, CLIP, VAE) with what trained applied, as LoraLoader / embedding:<name> / Load
        Checkpoint would give them from the saved files."""
        from .bridges import to_comfy

        dirs = [self.folder.name]
        if parts.get("full"):  # every weight changed: the whole model again, as Save Checkpoint + Load Checkpoint
            return to_comfy(model, dirs)
        if self.comfy is None:
            self.comfy = to_comfy(self.base, dirs)
        unet, clip, vae = self.comfy
        if "lora" in parts:
            import comfy.sd

            state = parts["lora"].export("preview").state  # the state dict Save LoRA writes
            unet, clip = comfy.sd.load_lora_for_models(unet, clip, state, 1.0, 1.0)
        return unet, clip, vae

    def _prompt(self, parts: dict) -> str:
        prompt = self.recipe.validation_prompt
        if "ti" not in parts:
            return prompt
        from safetensors.torch import save_file

        ti = parts["ti"]
        save_file(ti.export("preview").tensors(), str(Path(self.folder.name) / f"{PREVIEW_EMBEDDING}.safetensors"))
        return embedding_prompt(prompt, ti.token)

    @staticmethod
    def _controlled(method, positive, negative) -> tuple:
        """The conditioning with the ControlNet being trained applied as ControlNetLoader + Apply ControlNet
        (Advanced) apply Save ControlNet's file (original layout, fp16), at strength 1 over the whole schedule, on
        the run's validation condition."""
        import comfy.controlnet
        import nodes as comfy_nodes

        from ..trainers.adapters.controlnet.files import file_contents

        net = comfy.controlnet.load_controlnet_state_dict(file_contents(method.cn, "original", "fp16")[0])
        return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, net,
                                                                      method.validation_condition, 1.0, 0.0, 1.0)

    def __call__(self, model, method, seeds: list[int], width: int, height: int):
        import comfy.model_management as mm
        import torch

        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):  # as KSampler runs
            images = self._draw(model, pieces(method), seeds, width, height)
        if getattr(model.device, "type", "") == "cuda":  # the GPU back to the training
            mm.unload_all_models()
            mm.soft_empty_cache(force=True)
        return torch.cat(images)

    def _draw(self, model, parts: dict, seeds: list[int], width: int, height: int) -> list:
        import comfy.sample
        import nodes as comfy_nodes  # ComfyUI's own nodes.py

        unet, clip, vae = self._model(model, parts)
        r = self.recipe
        positive = comfy_nodes.CLIPTextEncode().encode(clip, self._prompt(parts))[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        if parts.get("controlnet") is not None and parts["controlnet"].validation_condition is not None:
            positive, negative = self._controlled(parts["controlnet"], positive, negative)
        images = []
        for seed in seeds:  # one picture per seed, each what KSampler gives at that seed
            latent = comfy_nodes.EmptyLatentImage().generate(width, height, 1)[0]["samples"]
            latent = comfy.sample.fix_empty_latent_channels(unet, latent)
            noise = comfy.sample.prepare_noise(latent, seed, None)
            out = comfy.sample.sample(unet, noise, r.validation_steps, r.validation_cfg, r.validation_sampler_name,
                                      r.validation_scheduler, positive, negative, latent, denoise=1.0,
                                      disable_pbar=True, seed=seed)  # no callback: the node's bar is the run's
            images.append(comfy_nodes.VAEDecode().decode(vae, {"samples": out})[0].float().cpu())
        return images
