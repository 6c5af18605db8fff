"""Model families: what differs between the toy, SD 1.x and SD 2.x lives here and nowhere else.

Adding a family (SDXL next) is one new :class:`Family` entry plus its shipped config folder and tests; the
trainers and nodes ask this registry instead of branching on a family's name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: the toy's shipped weights (trainers/toy/weights), whose folders carry their own configs
TOY_WEIGHTS = Path(__file__).resolve().parent / "toy" / "weights"


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    #: folder under the pack's configs/ holding a diffusers layout without weights (None: not single-file)
    config: str | None
    native_size: int
    #: text-encoder width = the UNet's cross_attention_dim, used to recognise a model
    context_dim: int
    #: dtype for sampling and frozen weights on a GPU
    gpu_dtype: str = "fp16"
    #: what a single file's weights predict: state dict -> "epsilon" or "v_prediction" (None: the shipped config's)
    detect: Callable[[dict[str, Any]], str] | None = None
    #: native size per prediction type, where it differs from native_size (SD 2.x: the 512 px base models predict
    #: epsilon, the 768 px models v)
    sizes: tuple[tuple[str, int], ...] = ()

    #: the text encoder's layout in a single-file checkpoint ("clip": SD 1.x's transformers names, "open_clip": SD
    #: 2.x's fused OpenCLIP resblocks); None: the family has no single-file layout (save a diffusers folder)
    single_file_text_encoder: str | None = None
    #: modelspec.architecture of its single-file checkpoints
    architecture: str = ""
    #: kohya's ss_base_model_version in its LoRA files (A1111 and the LoRA browsers group by it)
    base_model_version: str = ""
    #: guidance of the class pictures DreamBooth generates from it
    class_cfg: float = 7.0
    #: what the pack cannot train on this family yet: (method, or "method:mode", the reason)
    not_yet: tuple[tuple[str, str], ...] = ()

    def size_for(self, prediction: str) -> int:
        return dict(self.sizes).get(prediction, self.native_size)

    @property
    def config_dir(self) -> Path | None:
        return CONFIGS / self.config if self.config else None

    @property
    def controlnet_config(self) -> Path:
        """The diffusers config of this family's ControlNets (the toy's: its shipped toy ControlNet's)."""
        return (self.config_dir or TOY_WEIGHTS) / "controlnet" / "config.json"


#: prediction types a model may have (the scheduler's prediction_type); FT_LoadBaseModel's "auto" detects it
PREDICTIONS = ("epsilon", "v_prediction")
#: ComfyUI's test for SD 2.x single files (comfy/supported_models.py, SD20.model_type): the v-prediction models'
#: last output block has a wide spread in this norm's bias (std > 0.09), the epsilon base models a narrow one;
#: inpainting models (9 input channels) predict epsilon
SD2_MARKER = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_SPREAD = 0.09


def sd2_prediction(state: dict[str, Any]) -> str:
    marker = state.get(SD2_MARKER)
    first = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if marker is None or (first is not None and tuple(first.shape)[1] != 4):
        return "epsilon"
    return "v_prediction" if float(marker.float().std(unbiased=False)) > SD2_SPREAD else "epsilon"


#: SDXL-architecture families: what is not built for them yet (issue 19 builds it a piece at a time)
XL_NOT_YET = (("controlnet", "SDXL ControlNets are not built yet"),)


FAMILIES: dict[str, Family] = {
    "toy": Family("toy", "built-in toy model (32x32 shapes)", None, 32, 64, gpu_dtype="fp32",
                  base_model_version="finetune_toy", class_cfg=4.0),
    "toy_xl": Family("toy_xl", "built-in toy SDXL (32x32 shapes, two text encoders)", None, 32, 160,
                     gpu_dtype="fp32", base_model_version="finetune_toy_xl", class_cfg=4.0, not_yet=XL_NOT_YET),
    "sd15": Family("sd15", "Stable Diffusion 1.x", "sd15", 512, 768, detect=lambda state: "epsilon",
                   single_file_text_encoder="clip", architecture="stable-diffusion-v1", base_model_version="sd_v1"),
    "sd2": Family("sd2", "Stable Diffusion 2.x", "sd2", 768, 1024, detect=sd2_prediction,
                  sizes=(("epsilon", 512), ("v_prediction", 768)), single_file_text_encoder="open_clip",
                  architecture="stable-diffusion-v2", base_model_version="sd_v2"),
}


def check_supported(model, recipe) -> None:
    """Refuse, by name, a training the pack cannot do on ``model``'s family yet (before any work is done)."""
    fam = FAMILIES.get(model.family)
    if fam is None or not fam.not_yet:
        return
    wanted = {recipe.method}
    if getattr(recipe, "mode", "") == "full":
        wanted.add(f"{recipe.method}:full")
    if getattr(recipe, "pivotal_tuning", False):
        wanted.add(f"{recipe.method}:pivotal")
    for what, why in fam.not_yet:
        if what in wanted:
            raise ValueError(f"{what.replace(':', ' ')} on {fam.label} is not supported yet: {why}. LoRA, "
                             f"DreamBooth and Textual Inversion train this family today")


def family_for_unet(unet_config) -> Family:
    """Recognise the family of a diffusers UNet config."""
    ctx = unet_config.get("cross_attention_dim") if isinstance(unet_config, dict) else unet_config.cross_attention_dim
    for fam in FAMILIES.values():
        if fam.context_dim == ctx:
            return fam
    known = ", ".join(f"{f.label} ({f.context_dim})" for f in FAMILIES.values())
    raise ValueError(f"unrecognised model: its UNet's cross_attention_dim is {ctx}; the pack knows {known}. "
                     "SDXL and other families are not supported yet")


def family_for_checkpoint(keys_and_shapes: dict[str, tuple[int, ...]]) -> Family:
    """Recognise an original-layout (LDM) single-file checkpoint from its key names and shapes."""
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if k not in keys_and_shapes:
        if any(x.startswith("conditioner.embedders.1") for x in keys_and_shapes):
            raise ValueError("this looks like an SDXL checkpoint; SDXL is not supported yet (SD 1.x and 2.x are)")
        raise ValueError("not a Stable Diffusion 1.x/2.x checkpoint: it has no "
                         "'model.diffusion_model.input_blocks...' UNet weights in the original layout")
    ctx = keys_and_shapes[k][1]
    for fam in FAMILIES.values():
        if fam.config and fam.context_dim == ctx:
            return fam
    raise ValueError(f"unrecognised checkpoint: cross-attention width {ctx} (SD 1.x is 768, SD 2.x is 1024)")
