"""Full models as files: a diffusers folder, or the original single-file layout ComfyUI's CheckpointLoaderSimple,
A1111 and diffusers' ``from_single_file`` read (SD 1.x, 2.x and SDXL).

The single-file key names are the original (LDM) ones, mapped by :mod:`..families.ldm`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..families.ldm import TEXT_ENCODER_LAYOUTS, unet_key, vae_key
from ..families.registry import FAMILIES
from .deltas import has_deltas, plain_state_dict
from .model import FTModel


def to_single_file(model: FTModel, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The model's weights under original single-file names (SD 1.x, 2.x and SDXL), with the marker tensors
    ComfyUI writes for a v-prediction model (``v_pred``, and ``ztsnr`` for zero terminal SNR); a Z-Image's as
    ComfyUI's whole checkpoint (:func:`whole_checkpoint_state`)."""
    if model.family.checkpoint_parts:
        return {k: v.detach().to(dtype).contiguous().cpu() for k, v in whole_checkpoint_state(model).items()}
    if model.family.text_encoder_files and len(model.text_encoders) != len(model.family.text_encoder_files):
        raise ValueError(f"the {model.family.label} has {len(model.family.text_encoder_files)} text encoders; this "
                         f"model has {len(model.text_encoders)}")
    out = single_file_state(model.family, model.unet, model.vae, model.text_encoders)
    out = {k: v.detach().to(dtype).contiguous().cpu() for k, v in out.items()}
    if model.prediction_type == "v_prediction":
        out["v_pred"] = torch.tensor([])
        if model.scheduler_config.get("rescale_betas_zero_snr"):
            out["ztsnr"] = torch.tensor([])
    return out


def to_denoiser_file(model: FTModel, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A transformer family's denoiser alone in ComfyUI's native layout (what its UNETLoader reads from
    models/diffusion_models; Z-Image's releases ship this layout too), live adapters merged."""
    from ..families.zimage_native import to_native

    if model.family.denoiser_part != "transformer":
        raise ValueError(f"the {model.family.label} is saved as a whole checkpoint, not a diffusion model alone")
    return {k: v.detach().to(dtype).contiguous().cpu() for k, v in to_native(plain_state_dict(model.unet)).items()}


def whole_checkpoint_state(model: FTModel) -> dict[str, torch.Tensor]:
    """A transformer family's whole model as one checkpoint (its ``checkpoint_parts``), as ComfyUI's CheckpointSave
    writes a Z-Image and CheckpointLoaderSimple reads it: the denoiser in its native layout, each text encoder in
    transformers' names, the VAE in diffusers' (ComfyUI's VAE converts them); live adapters merged, as they are."""
    from ..families.zimage_native import to_native

    out: dict[str, torch.Tensor] = {}
    for part, prefix in model.family.checkpoint_parts.items():
        state = plain_state_dict(model.part(part))
        if part == model.family.denoiser_part:
            state = to_native(state)
        out.update({prefix + k: v for k, v in state.items()})
    return out


def single_file_state(fam, unet, vae, text_encoders) -> dict[str, torch.Tensor]:
    """The parts' tensors (live adapters merged) under the family's original single-file names, as they are."""
    if not fam.text_encoder_files:
        labels = [f.label for f in FAMILIES.values() if f.text_encoder_files]
        which = ", ".join(labels[:-1]) + " and " + labels[-1]
        raise ValueError(f"a single-file checkpoint is written for {which} models; this is the "
                         f"{fam.label}: save it as a diffusers folder")
    cfg = unet.config
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for k, v in plain_state_dict(unet).items():
        out["model.diffusion_model." + unet_key(k, cfg.layers_per_block, up_attn)] = v
    num_up = len(vae.config.up_block_types)
    for k, v in plain_state_dict(vae).items():
        nk = vae_key(k, num_up)
        if ".mid.attn_1." in nk and nk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out["first_stage_model." + nk] = v
    for te, (layout, prefix) in zip(text_encoders, fam.text_encoder_files):
        out.update(TEXT_ENCODER_LAYOUTS[layout](plain_state_dict(te), prefix))
    return out


def skeleton_state(fam) -> dict[str, torch.Tensor]:
    """The family's single-file state dict without weights: meta tensors of its shipped configs' shapes, for what
    needs only names and shapes (ComfyUI's model detection and LoRA key maps). Nothing is allocated."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = fam.config_dir
    if cfg is None:
        raise ValueError(f"the {fam.label} has no single-file layout")
    classes = (CLIPTextModel, CLIPTextModelWithProjection)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cfg / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg / "vae")))
        encoders = [cls(CLIPTextConfig.from_pretrained(str(cfg / part)))
                    for cls, part in zip(classes, fam.text_parts)]
    return single_file_state(fam, unet, vae, encoders)


def save_diffusers(model: FTModel, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers folder (StableDiffusionPipeline layout) with text-encoder keys every tool reads."""
    import copy

    from ..runs.export import legacy_text_encoder_keys

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder.name} already exists; nothing was overwritten")
    tmp = folder.with_name(f".{folder.name}.tmp")
    live = any(has_deltas(m) for m in model.parts().values())
    if live:  # applied LoRAs are merged into a copy, the model keeps sharing its weights
        model = model.clone()
    pipe = model.to_pipeline()
    if dtype != model.dtype:
        pipe = (pipe if live else copy.deepcopy(pipe)).to(dtype=dtype)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if type(model.text_encoder).__name__.startswith("CLIP"):  # Z-Image's Qwen3 keeps transformers' own names
        legacy_text_encoder_keys(tmp / "text_encoder")
    tmp.rename(folder)
    return folder
