"""The families the pack knows, and how a model is recognised as one of them.

Each entry is an instance of its lineage's class (:class:`~.sd.SD`, :class:`~.sdxl.SDXL`) with its facts; the
trainers and nodes ask a model's family object (``model.family``), never a family's name.
"""
from __future__ import annotations

import json
from typing import Any

from .base import CONFIGS, TOY_WEIGHTS, Family  # noqa: F401  (where the pack's configs and toy weights are)
from .sd import SD
from .sdxl import SDXL
from .zimage import ZImage


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


def sdxl_prediction(state: dict[str, Any]) -> str:
    """ComfyUI's test for SDXL-based files (comfy/supported_models.py, SDXL.model_type): v-prediction models carry
    an empty ``v_pred`` tensor (and ``ztsnr`` when trained with zero terminal SNR), which its CheckpointSave writes
    too; EDM files (Playground 2.5, ``edm_*``) are refused by :func:`family_for_checkpoint`."""
    return "v_prediction" if "v_pred" in state else "epsilon"


#: where each family's text encoders sit in an original-layout single file
CLIP_L, OPEN_CLIP = ("clip", "cond_stage_model.transformer."), ("open_clip", "cond_stage_model.model.")
SDXL_ENCODERS = (("clip", "conditioner.embedders.0.transformer."), ("open_clip", "conditioner.embedders.1.model."))


#: the rates the toys learn at: LoRA and DreamBooth lora mode measured over many concepts by
#: benchmarks/bench_concepts.py; full mode, Textual Inversion and ControlNet the rates their toy tests and examples
#: train at
TOY_RATES = (("lora", 1e-3), ("dreambooth", 1e-3), ("dreambooth:full", 2e-4), ("textual_inversion", 2e-2),
             ("controlnet", 1e-3))

#: the toys' DreamBooth (the toy's and the toy SDXL's), measured over their eleven new subjects with prior
#: preservation (benchmarks/bench_concepts.py --pp on). On the toy, at 1e-3 and 400 steps per subject the class
#: pictures' pull held five of them under 0.65; at 2e-3 and 800 every one is drawn in 0.78 or more of its pictures,
#: the class drifting at most 0.06. On the toy SDXL, judged at its cfg 2 (TOY_CFG; --model toy_xl --seeds 0), 2e-3
#: and 800 draw 6 of 11 subjects in 0.9 of their pictures where 1e-3 and 400 drew 3 (their sum 9.4 against 7.3; the
#: purple cross 0.84 against 0.12, the purple star 0.62 against 0.81). The toy audio model keeps 1e-3 and 400: not
#: measured; the toy Z-Image's are below. Full mode, on the toy (--mode full --pp on --seeds 0, cfg 2): at 2e-4 and
#: 400 steps four of the eleven reached 0.9 and the class drifted up to 0.78 (the whole UNet repaints "a triangle"
#: purple); at 4e-4 and 800 six reach 0.9, the crosses 0.75-0.94 (0.22-0.44 before), the class drifts at most 0.06. A
#: five-concept sweep put the drift on the steps (0.59-0.78 at 400, at most 0.09 at 800) and 4e-4 ahead of 1e-4 and
#: 2e-4; issue 17's two-subject test measured the same (drift 0.00-0.03 at 4e-4, 0.27 at 2e-4, 5 seeds). Over seeds
#: 0-2 full mode draws five of the eleven in 0.9 by the mean, the class drifting at most 0.06
TOY_DB_RATES = tuple((m, {"dreambooth": 2e-3, "dreambooth:full": 4e-4}.get(m, r)) for m, r in TOY_RATES)
TOY_DB_STEPS = (("dreambooth", 800), ("dreambooth:full", 800))

#: the toys' sampling guidance (the toy's and the toy SDXL's). Classifier-free guidance overshoots the gap to an
#: unconditional prediction that learnt little of a new subject, and draws blobs: with prior preservation and the
#: defaults, the toy SDXL's purple square is drawn in 0.78 of its pictures at cfg 2, 0.03 at 3, 0.00 at 4 (1e-3, 400
#: steps; 1.00 and 0.00 at TOY_DB_RATES' 2e-3 and 800), its eleven subjects sum to 7.3 at 2, 5.4 at 3, 4.3 at 4
#: (benchmarks/bench_concepts.py --model toy_xl --pp on --seeds 0 --cfg 2,3,4). On the toy (--pp on --seeds 0,1,2
#: --cfg 2,4) every subject that is not a cross is drawn in 0.94 or more on every seed at 2 (at 4 the purple
#: triangle 0.84 on one), and with two subjects (--subjects 2) each is within 10 points of what it draws alone at 2
#: (at 4 a purple circle beside a yellow triangle 0.00, at 3 0.38); its crosses, a shape it never drew, lose 5-11
#: points at 2 (0.62-0.78 against 0.73-0.86) and fall short at either. Both bases draw every class they know right at 2
TOY_CFG = 2.0

#: the layers the toys' adapters train: the convolutions too. A toy draws its colours in its convolutional top
#: level, which has no attention (as SD's has), so an adapter on attention alone cannot repaint it: on the toy SDXL,
#: DreamBooth on attention + feed-forward drew a new purple circle in 2 of 32 pictures (purple blobs), with the
#: convolutions in 32 of 32 (benchmarks/bench_concepts.py --model toy_xl --seeds 0)
TOY_TARGETS = (("lora", "attention+feedforward+conv"), ("dreambooth", "attention+feedforward+conv"))

#: the toy Z-Image's DreamBooth in lora mode (benchmarks/bench_concepts.py --model toy_zimage --pp on --seeds 0, cfg
#: 4): at 1e-3 and 400 steps its eleven new subjects were drawn in 0.06-0.53 of their pictures (mean 0.16), most as
#: often as the class prompt drew them (the transformer had not yet told "sks" apart); at 2e-3 and 800 they reach
#: 0.47-0.97 (mean 0.69), the class drifting at most 0.16 on eight of them and 0.53-0.75 on the purple circle, the
#: purple square and the yellow triangle. Full mode keeps the toys' 2e-4 and 400: not measured
TOY_ZIMAGE_RATES = tuple((m, {"dreambooth": 2e-3}.get(m, r)) for m, r in TOY_RATES)
TOY_ZIMAGE_STEPS = (("dreambooth", 800), ("dreambooth:full", 400))
#: ... and its batch: at 2e-3 and 800 steps a batch of 1 left "a sks circle / square / yellow triangle" drawn as
#: often as their class (0.78 / 0.75, 0.59 / 0.53, 0.53 / 0.53 subject / drift; 1600 steps did not help: 0.97 / 0.28,
#: 0.97 / 0.00, 0.09 / 0.09); a batch of 4 draws the three 1.00 / 0.00 (--batch 4), and all eleven at a mean of 0.90
#: (0.75-1.00, the crosses and the purple star short of 0.9), the class drifting 0.00 on every one
TOY_ZIMAGE_BATCH = (("dreambooth", 4), ("dreambooth:full", 1))
#: the layers the toy Z-Image's adapters train (its transformer has no convolutions)
TOY_ZIMAGE_TARGETS = (("lora", "attention+feedforward"), ("dreambooth", "attention+feedforward"))
#: what Z-Image cannot be trained for yet, and why
ZIMAGE_NOT_YET = (
    ("textual_inversion", "ComfyUI 0.8 reads no embeddings for Z-Image (its Qwen3 tokenizer is given no embedding "
                          "folder), so a trained word could not be used there; train a LoRA"),
    ("controlnet", "the pack trains ControlNets for the UNet families; Z-Image's ControlNets are another "
                   "architecture (ComfyUI loads them as model patches)"),
)

#: Z-Image's rates: the field's for LoRA on a 6 B flow transformer (ai-toolkit's and OneTrainer's Z-Image presets
#: train rank-16 LoRAs at 1e-4)
ZIMAGE_RATES = (("lora", 1e-4), ("dreambooth", 1e-4), ("dreambooth:full", 5e-6))
#: Z-Image's LoRA targets: attention for a LoRA (the field's default), with the feed-forward for DreamBooth
ZIMAGE_TARGETS = (("lora", "attention"), ("dreambooth", "attention+feedforward"))
ZIMAGE_FULL = (("dreambooth:full", "a full fine-tune of the 6 B transformer needs its weights, gradients and AdamW "
                                   "state (about 74 GB in bf16 and fp32 moments), past every 24-48 GB GPU; train "
                                   "DreamBooth in lora mode"),)

FAMILIES: dict[str, Family] = {
    "toy": SD("toy", "built-in toy model (32x32 shapes)", None, 32, 64, gpu_dtype="fp32",
                  base_model_version="finetune_toy", class_cfg=4.0, sample_cfg=TOY_CFG,
                  learning_rates=TOY_DB_RATES, train_steps=TOY_DB_STEPS, lora_targets=TOY_TARGETS),
    "toy_xl": SDXL("toy_xl", "built-in toy SDXL (32x32 shapes, two text encoders)", None, 32, 160,
                     gpu_dtype="fp32", base_model_version="finetune_toy_xl", class_cfg=4.0,
                     sample_cfg=TOY_CFG, learning_rates=TOY_DB_RATES, train_steps=TOY_DB_STEPS,
                     lora_targets=TOY_TARGETS),
    "toy_audio": SD("toy_audio", "built-in toy audio model (64x64 mel spectrograms of tones)", None, 64, 48,
                    gpu_dtype="fp32", base_model_version="finetune_toy_audio", class_cfg=4.0, sample_cfg=4.0,
                    sound_preset="toy_8k_64mel", learning_rates=TOY_RATES, lora_targets=TOY_TARGETS),
    "toy_zimage": ZImage("toy_zimage", "built-in toy Z-Image (32x32 shapes, flow matching, one Qwen3)", None, 32,
                         64, gpu_dtype="fp32", base_model_version="finetune_toy_zimage", class_cfg=4.0,
                         sample_cfg=4.0, learning_rates=TOY_ZIMAGE_RATES, train_steps=TOY_ZIMAGE_STEPS,
                         train_batch=TOY_ZIMAGE_BATCH, lora_targets=TOY_ZIMAGE_TARGETS, max_tokens=64,
                         not_yet=ZIMAGE_NOT_YET),
    "sd15": SD("sd15", "Stable Diffusion 1.x", "sd15", 512, 768, detect=lambda state: "epsilon",
                   text_encoder_files=(CLIP_L,), architecture="stable-diffusion-v1", base_model_version="sd_v1"),
    "sd2": SD("sd2", "Stable Diffusion 2.x", "sd2", 768, 1024, detect=sd2_prediction,
                  sizes=(("epsilon", 512), ("v_prediction", 768)), text_encoder_files=(OPEN_CLIP,),
                  architecture="stable-diffusion-v2", base_model_version="sd_v2"),
    "zimage": ZImage("zimage", "Z-Image", "zimage", 1024, 2560, gpu_dtype="bf16", architecture="z-image",
                     base_model_version="zimage", class_cfg=4.0, sample_cfg=5.0, checkpointing_on_gpu=True,
                     vae_upcast=True, learning_rates=ZIMAGE_RATES, lora_targets=ZIMAGE_TARGETS,
                     not_yet=ZIMAGE_NOT_YET + ZIMAGE_FULL),
    "sdxl": SDXL("sdxl", "Stable Diffusion XL", "sdxl", 1024, 2048, detect=sdxl_prediction,
                   text_encoder_files=SDXL_ENCODERS, architecture="stable-diffusion-xl-v1-base",
                   base_model_version="sdxl_base_v1-0", class_cfg=5.0, sample_cfg=5.0, vae_upcast=True,
                   checkpointing_on_gpu=True),
}


#: every prefix a LoRA file of a known family starts its module names with
LORA_PREFIXES = tuple(sorted({p for fam in FAMILIES.values() for p in fam.lora_prefixes.values()}))


def family_for_unet(unet_config) -> Family:
    """Recognise the family of a diffusers UNet config."""
    ctx = unet_config.get("cross_attention_dim") if isinstance(unet_config, dict) else unet_config.cross_attention_dim
    unets = [fam for fam in FAMILIES.values() if fam.denoiser_part == "unet"]
    for fam in unets:
        if fam.context_dim == ctx:
            return fam
    known = ", ".join(f"{f.label} ({f.context_dim})" for f in unets)
    raise ValueError(f"unrecognised model: its UNet's cross_attention_dim is {ctx}; the pack knows {known}")


def family_of_comfy_class(name: str) -> Family | None:
    """The family of the real models ComfyUI holds as model class ``name`` where the pack takes them part by part
    (Z-Image's ``ZImage``); None for the rest (the UNet families are told by their weights)."""
    return next((f for f in FAMILIES.values() if f.config and f.comfy_class == name), None)


#: an original-layout UNet's cross-attention key projection: its input width is the text encoders' width
CROSS_ATTENTION_K = "attn2.to_k.weight"


def family_for_checkpoint(keys_and_shapes: dict[str, tuple[int, ...]]) -> Family:
    """Recognise an original-layout (LDM) single-file checkpoint from its key names and shapes: the UNet's
    cross-attention width and where its text encoders sit (``cond_stage_model.*`` or SDXL's
    ``conditioner.embedders.N.*``)."""
    unet = "model.diffusion_model."
    k = next((k for k in keys_and_shapes if k.startswith(unet) and k.endswith(CROSS_ATTENTION_K)), None)
    if k is None:
        raise ValueError("not a Stable Diffusion 1.x, 2.x or XL checkpoint: it has no 'model.diffusion_model.*' UNet "
                         "weights with cross-attention in the original layout (a LoRA, embedding or VAE file goes in "
                         "its own folder; a diffusers model is a folder in models/diffusers)")
    if any(x.startswith("edm_") for x in keys_and_shapes):
        raise ValueError("this is an EDM checkpoint (Playground 2.5 or an EDM v-prediction model), which the pack "
                         "cannot train: it trains epsilon and v-prediction models")
    ctx = keys_and_shapes[k][1]
    # a whole checkpoint's text encoders must sit where the family keeps them; a UNet alone (ComfyUI's MODEL) is
    # told by its width
    has_text_encoders = any(x.startswith(("cond_stage_model.", "conditioner.")) for x in keys_and_shapes)
    for fam in FAMILIES.values():
        if fam.text_encoder_files and fam.context_dim == ctx and (not has_text_encoders or all(
                any(x.startswith(prefix) for x in keys_and_shapes) for _, prefix in fam.text_encoder_files)):
            return fam
    if ctx == 1280 and any(x.startswith("conditioner.embedders.0.model.") for x in keys_and_shapes):
        raise ValueError("this is the SDXL refiner (one OpenCLIP text encoder, cross-attention width 1280), which "
                         "the pack does not train; SDXL base models and their fine-tunes are supported")
    known = ", ".join(f"{f.label} {f.context_dim}" for f in FAMILIES.values() if f.text_encoder_files)
    raise ValueError(f"unrecognised checkpoint: cross-attention width {ctx} ({known})")


# ------------------------------------------------------------------- the family a saved file was made for --
def family_named_in(config) -> Family | None:
    """The family a file's ``finetune_config`` (dict or JSON text) names, or None."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    name = ((config or {}).get("model") or {}).get("family") if isinstance(config, dict) else None
    return FAMILIES.get(name)


def family_of_lora(lora) -> Family | None:
    """The family a LoRA was trained on: its training config's, else its ``ss_base_model_version``'s."""
    fam = family_named_in(lora.metadata.get("finetune_config"))
    version = lora.metadata.get("ss_base_model_version")
    return fam or next((f for f in FAMILIES.values() if version and f.base_model_version == version), None)


def family_of_embedding(emb) -> Family | None:
    """The family whose text encoders are as wide as the embedding's vectors (SDXL: both sets together)."""
    fam = family_named_in(emb.metadata.get("finetune_config"))
    width = emb.vectors.shape[-1] + (0 if emb.vectors_2 is None else emb.vectors_2.shape[-1])
    if fam is not None and fam.context_dim == width:
        return fam
    two = emb.vectors_2 is not None
    return next((f for f in FAMILIES.values() if f.config and f.context_dim == width
                 and (len(f.text_encoder_files) == 2) == two), None)
