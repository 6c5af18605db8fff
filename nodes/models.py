"""finetune/models: load a base model (the loading itself is the library's trainers.sources; this node
lists ComfyUI's model folders and passes its folder lookup)."""
from __future__ import annotations

from ..trainers.sources import BUILTINS, OFFLOAD, PREDICTION
from ..trainers.toy.loader import TOY_SOURCE as TOY  # the built-in toy's name: the node's default
from . import host
from .base import COMBO, HIDDEN, ROOT_CATEGORY, torch_call

DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["auto", "fp32", "fp16", "bf16"]


def base_model_choices() -> list[str]:
    """The built-in toys first, then diffusers folders and single-file checkpoints from ComfyUI's model folders."""
    return (list(BUILTINS) + [f"diffusers/{n}" for n in host.list_models("diffusers", folders=True)]
            + [f"checkpoints/{n}" for n in host.list_models("checkpoints")])


def comfy_tokenizer_dir(folder: str) -> str | None:
    """A vocabulary ComfyUI ships (``folder`` under its comfy/), when running inside ComfyUI: ``sd1_tokenizer``
    (SD 1.x/2.x's CLIP), ``text_encoders/qwen25_tokenizer`` (the Qwen vocabulary it reads Z-Image's prompts with)."""
    if not host.in_comfyui():
        return None
    import os

    import comfy.sd1_clip

    path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), *folder.split("/"))
    return path if os.path.isfile(os.path.join(path, "vocab.json")) else None


def sd1_tokenizer_dir() -> str | None:
    return comfy_tokenizer_dir("sd1_tokenizer")


def qwen_tokenizer_dir() -> str | None:
    return comfy_tokenizer_dir("text_encoders/qwen25_tokenizer")


def load_base_model(model_name: str, device: str = "auto", dtype: str = "auto", offload: str = "auto",
                    prediction: str = "auto"):
    """The library's :func:`~..trainers.sources.load_base_model`, finding model files in ComfyUI's model
    folders and single-file checkpoints' vocabulary in ComfyUI's own, when it runs inside ComfyUI."""
    from ..trainers import sources

    return sources.load_base_model(model_name, device, dtype, offload, prediction, resolve=host.model_path,
                                   tokenizer_dir=comfy_tokenizer_dir)


class FT_LoadBaseModel:
    DESCRIPTION = ("Load a text-to-image model to sample or fine-tune: the built-in toy model (32x32 coloured "
                   "shapes, runs in seconds on a CPU), the built-in toy SDXL (the same world in SDXL's architecture: "
                   "two text encoders, pooled embedding and size/crop time ids), a diffusers folder from "
                   "models/diffusers, or a single-file SD 1.x, 2.x or SDXL .safetensors checkpoint from "
                   "models/checkpoints (SDXL fine-tunes and v-prediction SDXL models included; the refiner, EDM and "
                   "other flow models are not), or a whole Z-Image checkpoint there (what ComfyUI's Save Checkpoint "
                   "writes of one; its three separate files go in Load Z-Image). Nothing is downloaded.")
    CATEGORY = f"{ROOT_CATEGORY}/models"
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for FT_Sample and the training nodes.",)
    FUNCTION = "load"
    SHOWS = ("text",)  # room the example layouts leave for its line (workflows.py)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": COMBO(base_model_choices(), "Which model: the built-in toy (or toy SDXL, or toy audio: tones "
                                    "as spectrograms), a diffusers folder (models/diffusers) or a single-file "
                                    "checkpoint (models/checkpoints).",
                                    TOY),
                "device": COMBO(DEVICES, "Where the model runs: auto picks the GPU when there is one."),
                "dtype": COMBO(DTYPES, "Weight precision: auto is fp16 on a GPU for SD models and fp32 on the CPU."),
            },
            "optional": {
                "offload": COMBO(OFFLOAD, "On a GPU. auto: the weights wait in CPU memory and visit the GPU only "
                                 "while they sample or train, as ComfyUI keeps its models (training keeps the UNet "
                                 "there and lets the VAE and text encoder go once their outputs are cached), so the "
                                 "GPU holds only what is in use. off: they stay on the GPU (no copy per run, more "
                                 "GPU memory)."),
                "prediction": COMBO(PREDICTION, "What the model predicts, which sets the training target and the "
                                    "sampler. auto: detected from a single file's weights (SD 2.x: the 512 px base "
                                    "models predict epsilon, the 768 px ones v-prediction, as ComfyUI tells them "
                                    "apart), or a diffusers folder's scheduler config. Set it when a fine-tune's "
                                    "card says otherwise; the node shows what was chosen."),
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model_name, device="auto", dtype="auto", offload="auto", prediction="auto"):
        return (load_base_model(model_name, device, dtype, offload, prediction),)

    def load(self, *args, **kwargs):
        """What ComfyUI calls: the model, and a line in the node saying what it is (family, size, prediction)."""
        out = self.execute(*args, **kwargs)
        return {"ui": {"text": [out[0].describe()]}, "result": out}


def files_in(kind: str) -> list[str]:
    """The .safetensors files ComfyUI lists in models/<kind>, or one entry saying there are none."""
    return host.list_models(kind) or [f"(no files in models/{kind})"]


class FT_LoadZImage:
    DESCRIPTION = ("Load Z-Image (Base or Turbo) to sample or fine-tune from the three files ComfyUI holds it as: "
                   "the transformer in models/diffusion_models (what UNETLoader reads), the Qwen3-4B text encoder in "
                   "models/text_encoders (CLIPLoader's) and the Flux VAE in models/vae (VAELoader's). Train LoRAs on "
                   "Base and apply them to Turbo: Turbo is distilled to draw in 8 steps at cfg 1, and training on it "
                   "undoes that. Prompts are read "
                   "with ComfyUI's own Qwen vocabulary, so this node runs inside ComfyUI (or the shell with "
                   "--tokenizer). Nothing is downloaded.")
    CATEGORY = f"{ROOT_CATEGORY}/models"
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded Z-Image, for FT_Sample and the training nodes.",)
    FUNCTION = "load"
    SHOWS = ("text",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "diffusion_model": COMBO(files_in("diffusion_models"), "The Z-Image transformer "
                                         "(models/diffusion_models, ComfyUI's layout: z_image_turbo_bf16.safetensors "
                                         "and the like)."),
                "text_encoder": COMBO(files_in("text_encoders"), "The Qwen3-4B text encoder "
                                      "(models/text_encoders, e.g. qwen_3_4b.safetensors)."),
                "vae": COMBO(files_in("vae"), "The Flux VAE (models/vae, ae.safetensors)."),
                "device": COMBO(DEVICES, "Where the model runs: auto picks the GPU when there is one."),
                "dtype": COMBO(DTYPES, "Weight precision: auto is bf16 on a GPU for Z-Image and fp32 on the CPU."),
            },
            "optional": {
                "offload": COMBO(OFFLOAD, "On a GPU. auto: the weights wait in CPU memory and visit the GPU only "
                                 "while they run; training keeps the transformer there and lets the text encoder "
                                 "go once the captions are encoded. off: everything stays on the GPU."),
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, diffusion_model, text_encoder, vae, device="auto", dtype="auto", offload="auto"):
        from ..trainers.model.zimage_files import load_zimage_files

        for kind, name in (("diffusion_models", diffusion_model), ("text_encoders", text_encoder), ("vae", vae)):
            if name.startswith("(no files in"):
                raise FileNotFoundError(f"models/{kind} holds no .safetensors file: put Z-Image's there (see the node's "
                                        "help), then refresh the page")
        model = load_zimage_files(host.model_path("diffusion_models", diffusion_model),
                                  host.model_path("text_encoders", text_encoder), host.model_path("vae", vae),
                                  qwen_tokenizer_dir(), device, dtype, offload=offload == "auto")
        model.source = f"diffusion_models/{diffusion_model}"
        return (model,)

    def load(self, *args, **kwargs):
        out = self.execute(*args, **kwargs)
        return {"ui": {"text": [out[0].describe()]}, "result": out}
