"""Load the shipped toy world: the text-to-image model, its CLIP scorer and its judge."""
from __future__ import annotations

from pathlib import Path

from . import WEIGHTS

#: how config.json names the built-in toy model (the Load Base Model choice)
TOY_SOURCE = "toy (built-in)"


def missing_weights_error(folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"the toy model's weights are missing from {folder}. They ship with the pack; if you removed them, "
        "rebuild them with: python -m comfyui_finetune.trainers.toy build")


def load_toy_model(folder: str | Path = WEIGHTS, device="cpu"):
    return _load_sd_layout(Path(folder) / "pipeline", "toy", TOY_SOURCE).to(device)


#: how config.json names the built-in toy audio model, and its folder inside the weights folder
TOY_AUDIO_SOURCE = "toy audio (built-in)"
AUDIO_FOLDER = "pipeline_audio"


def load_toy_audio_model(folder: str | Path = WEIGHTS, device="cpu"):
    """The toy audio model: the toy's architecture trained on the toy sound world's 64 x 64 mel-spectrogram
    pictures (trainers/audio, preset toy_8k_64mel); its pictures become sound with Spectrogram to Audio."""
    return _load_sd_layout(Path(folder) / AUDIO_FOLDER, "toy_audio", TOY_AUDIO_SOURCE).to(device)


def _load_sd_layout(p: Path, family: str, source: str):
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..model.model import FTModel

    if not (p / "unet" / "diffusion_pytorch_model.safetensors").exists():
        raise missing_weights_error(p)
    with torch.inference_mode(False):
        unet = UNet2DConditionModel.from_pretrained(str(p / "unet"), use_safetensors=True).eval()
        vae = AutoencoderKL.from_pretrained(str(p / "vae"), use_safetensors=True).eval()
        te = CLIPTextModel.from_pretrained(str(p / "text_encoder"), use_safetensors=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(p / "tokenizer"))
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    return FTModel(family, family, unet, vae, te, tok, sched, source=source)


#: how config.json names the built-in toy SDXL, and its folder inside the weights folder (its VAE is the toy's own,
#: in pipeline/vae)
TOY_XL_SOURCE = "toy SDXL (built-in)"
XL_FOLDER = "pipeline_xl"


def load_toy_xl_model(folder: str | Path = WEIGHTS, device="cpu"):
    """The toy SDXL: an SDXL-architecture model of the toy world (two text encoders, pooled embedding and time ids),
    sharing the toy's VAE."""
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..model.model import FTModel
    p = Path(folder) / XL_FOLDER
    if not (p / "unet" / "diffusion_pytorch_model.safetensors").exists():
        raise missing_weights_error(p)
    with torch.inference_mode(False):
        unet = UNet2DConditionModel.from_pretrained(str(p / "unet"), use_safetensors=True).eval()
        vae = AutoencoderKL.from_pretrained(str(Path(folder) / "pipeline" / "vae"), use_safetensors=True).eval()
        te = CLIPTextModel.from_pretrained(str(p / "text_encoder"), use_safetensors=True).eval()
        te2 = CLIPTextModelWithProjection.from_pretrained(str(p / "text_encoder_2"), use_safetensors=True).eval()
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    model = FTModel("toy_xl", "toy_xl", unet, vae, te, CLIPTokenizer.from_pretrained(str(p / "tokenizer")), sched,
                    source=TOY_XL_SOURCE, text_encoder_2=te2,
                    tokenizer_2=CLIPTokenizer.from_pretrained(str(p / "tokenizer_2")))
    return model.to(device)


def load_toy_controlnet(folder: str | Path = WEIGHTS):
    """The toy ControlNet: follows Canny edge maps of toy pictures (made with control.CANNY thresholds)."""
    from ..adapters.controlnet.files import load_folder

    p = Path(folder) / "controlnet"
    if not (p / "config.json").exists():
        raise missing_weights_error(p)
    cn = load_folder(p)
    cn.name, cn.source = "toy canny", "built-in toy ControlNet (Canny edges)"
    return cn


def load_toy_judge(folder: str | Path = WEIGHTS):
    from .judge import ToyJudge

    if not (Path(folder) / "judge" / "model.safetensors").exists():
        raise missing_weights_error(Path(folder) / "judge")
    return ToyJudge.load(Path(folder) / "judge")


#: how config.json names the built-in toy Z-Image, and its folder inside the weights folder
TOY_ZIMAGE_SOURCE = "toy Z-Image (built-in)"
ZIMAGE_FOLDER = "pipeline_zimage"


def load_toy_zimage_model(folder: str | Path = WEIGHTS, device="cpu"):
    """The toy Z-Image: Z-Image's architecture (a flow-matching single-stream transformer, one Qwen3 text encoder,
    a 16-channel VAE) trained on the toy world, a diffusers ZImagePipeline folder."""
    from ..model.zimage_files import load_zimage_folder

    p = Path(folder) / ZIMAGE_FOLDER
    if not (p / "transformer" / "diffusion_pytorch_model.safetensors").exists():
        raise missing_weights_error(p)
    model = load_zimage_folder(p, "cpu", "fp32", family="toy_zimage")
    model.name, model.source, model.prediction_source = "toy_zimage", TOY_ZIMAGE_SOURCE, ""
    return model.to(device)
