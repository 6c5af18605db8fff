"""finetune/models: load a base model."""
from __future__ import annotations

from . import host
from .base import COMBO, HIDDEN, ROOT_CATEGORY, torch_call

TOY = "toy (built-in)"
DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["auto", "fp32", "fp16", "bf16"]


def base_model_choices() -> list[str]:
    """The toy first, then diffusers folders and single-file checkpoints from ComfyUI's model folders."""
    return ([TOY] + [f"diffusers/{n}" for n in host.list_models("diffusers", folders=True)]
            + [f"checkpoints/{n}" for n in host.list_models("checkpoints")])


def sd1_tokenizer_dir():
    """ComfyUI ships the SD 1.x/2.x CLIP vocabulary (comfy/sd1_tokenizer); use it when running inside ComfyUI."""
    if not host.in_comfyui():
        return None
    import os

    import comfy.sd1_clip

    path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer")
    return path if os.path.isfile(os.path.join(path, "vocab.json")) else None


OFFLOAD = ["auto", "off"]


def load_base_model(model_name: str, device: str = "auto", dtype: str = "auto", offload: str = "auto"):
    """The model ``model_name`` names, remembering the name as its source (config.json records it). On a GPU with
    ``offload`` auto its weights wait in CPU memory and visit the GPU while they run."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD)}")
    model = _load(model_name, device, dtype)
    model.source = TOY if model_name in (TOY, "toy") else model_name
    if offload == "auto" and model.device.type == "cuda":
        model.offload_weights()
        import torch

        torch.cuda.empty_cache()
    return model


def _load(model_name: str, device: str, dtype: str):
    from ..trainers import loading

    if model_name == TOY or model_name == "toy":
        from ..trainers.toy.loader import load_toy_model

        dev = loading.resolve_device(device)
        model = load_toy_model(device=dev)
        return model.to(dev, loading.resolve_dtype(dtype, dev, "toy"))
    kind, _, name = model_name.partition("/")
    if kind == "diffusers" and name:
        return loading.load_diffusers_folder(host.model_path("diffusers", name), device, dtype)
    if kind == "checkpoints" and name:
        return loading.load_single_file(host.model_path("checkpoints", name), sd1_tokenizer_dir(), device, dtype)
    raise ValueError(f"model_name {model_name!r} is not '{TOY}', 'diffusers/<folder>' or 'checkpoints/<file>'")


class FT_LoadBaseModel:
    DESCRIPTION = ("Load a text-to-image model to sample or fine-tune: the built-in toy model (32x32 coloured "
                   "shapes, runs in seconds on a CPU), a diffusers folder from models/diffusers, or a single-file "
                   "SD 1.x/2.x .safetensors checkpoint from models/checkpoints. Nothing is downloaded.")
    CATEGORY = f"{ROOT_CATEGORY}/models"
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for FT_Sample and the training nodes.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": COMBO(base_model_choices(), "Which model: the built-in toy, a diffusers folder "
                                    "(models/diffusers) or a single-file checkpoint (models/checkpoints).", TOY),
                "device": COMBO(DEVICES, "Where the model runs: auto picks the GPU when there is one."),
                "dtype": COMBO(DTYPES, "Weight precision: auto is fp16 on a GPU for SD models and fp32 on the CPU."),
            },
            "optional": {
                "offload": COMBO(OFFLOAD, "On a GPU. auto: the weights wait in CPU memory and visit the GPU only "
                                 "while they sample or train, as ComfyUI keeps its models (training keeps the UNet "
                                 "there and lets the VAE and text encoder go once their outputs are cached), so the "
                                 "GPU holds only what is in use. off: they stay on the GPU (no copy per run, more "
                                 "GPU memory)."),
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model_name, device="auto", dtype="auto", offload="auto"):
        return (load_base_model(model_name, device, dtype, offload),)
