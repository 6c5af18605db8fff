"""finetune/bridges: the pack's FT_MODEL and FT_LORA to and from ComfyUI's own MODEL, CLIP and VAE.

They call ComfyUI's own loaders (``comfy.sd``), so they are registered only when ComfyUI is importable. A LoRA goes
to ComfyUI as the very state dict Save LoRA writes (the kohya layout its LoraLoader reads), through the function
LoraLoader calls; whole models travel as original-layout single-file state dicts in memory, the layout of
ComfyUI's CheckpointSave and of the pack's Save Checkpoint, so no file is written or read twice.
"""
from __future__ import annotations

from . import host
from .base import COMBO, FLOAT, HIDDEN, LINK, ROOT_CATEGORY, checked, torch_call
from .models import DEVICES, DTYPES, OFFLOAD, qwen_tokenizer_dir, sd1_tokenizer_dir

CATEGORY = f"{ROOT_CATEGORY}/bridges"
ONLY_IN_COMFYUI = " Listed only inside ComfyUI: it hands the model to ComfyUI's own loaders."
#: ComfyUI's sampling classes -> the scheduler's prediction_type the pack trains and samples with
PREDICTIONS = {"V_PREDICTION": "v_prediction", "EPS": "epsilon"}
#: the marker tensors ComfyUI's state_dict_for_saving adds beside the weights (v-prediction, zero terminal SNR)
MARKERS = ("v_pred", "ztsnr")


def comfy_prediction(model) -> str | None:
    """What ComfyUI's MODEL predicts ("epsilon", "v_prediction"), or None for what the pack cannot train (EDM,
    flow matching, x0)."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingDiscrete) or isinstance(sampling, (ms.EDM, ms.X0)):
        return None
    for cls in type(sampling).__mro__:
        if cls.__module__ == ms.__name__ and cls.__name__ in PREDICTIONS:
            return PREDICTIONS[cls.__name__]
    return None


def unsupported_reason(state: dict, comfy_config: str) -> str | None:
    """Why the pack cannot take this original-layout state dict, naming ComfyUI's model class; None if it can.
    The family comes from the pack's registry; what its shipped configs lack (inpainting inputs, image
    conditioning) is named too."""
    from ..trainers.families.registry import FAMILIES, family_for_checkpoint

    supported = ", ".join(f.label for f in FAMILIES.values() if f.text_encoder_files or (f.config and f.comfy_class))
    try:
        fam = family_for_checkpoint({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")})
    except ValueError as e:
        return (f"ComfyUI's model is {comfy_config}, a family the pack cannot train or sample ({e}); the pack "
                f"supports {supported}")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        return (f"ComfyUI's model is {comfy_config} with {conv_in.shape[1]} input channels (an inpainting or "
                f"instruct model); the pack's {fam.label} takes 4")
    label = state.get("model.diffusion_model.label_emb.0.0.weight")
    adm = fam.unet_config().get("projection_class_embeddings_input_dim")  # SDXL's pooled text + time ids
    if any(k.startswith("model.diffusion_model.label_emb.") for k in state) and (
            label is None or adm is None or label.shape[1] != adm):
        return (f"ComfyUI's model is {comfy_config}, which is conditioned on images (unCLIP) or other extra "
                f"inputs; the pack supports plain {supported}")
    return None


# ------------------------------------------------------------------------------ where ComfyUI versions differ --
# Told apart by what ComfyUI's objects have, never by its version number. ComfyUI 0.8 bakes patches into its weights
# in place when asked (force_patch_weights) and copies what its loader is given; newer ComfyUI (Dynamic VRAM, on by
# default on NVIDIA) refuses force_patch_weights, hands patched weights out lazily, and loads by assigning the very
# tensors it is given.

def materialized(value):
    """A plain tensor for one value of ComfyUI's state dict. Newer ComfyUI hands out weights whose patches (LoRAs,
    merges) are not applied yet (``LazyCastingParam``: its own storage is the *unpatched* weight); they announce
    themselves with a ``device`` that is not a torch device, and moving one applies its patches."""
    import torch

    if isinstance(value, torch.Tensor) and not isinstance(value.device, torch.device):
        value = value.to("cpu")
    return value


def comfy_checkpoint(model, clip, vae) -> dict:
    """The original-layout state dict ComfyUI's CheckpointSave would write from this MODEL, CLIP and VAE, every
    patch baked in, as plain tensors (some may still be ComfyUI's own: the caller must not keep them)."""
    import comfy.model_management as mm
    import torch

    with torch.inference_mode():
        if hasattr(model, "state_dict_for_saving"):  # patches applied lazily, on the way out (ComfyUI's save_checkpoint)
            mm.load_models_gpu([model, clip.load_model()])
            clip_sd = clip.state_dict_for_saving() if hasattr(clip, "state_dict_for_saving") else clip.get_sd()
            state = model.state_dict_for_saving(clip_sd, vae.get_sd())
        else:  # ComfyUI 0.8: as its CheckpointSave, every patch baked into the weights in place
            mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
            state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
        return {k: materialized(v) for k, v in state.items()}


def unaliased(state: dict, model, loader) -> dict:
    """``state`` (from :func:`comfy_state`) made safe to hand to ComfyUI's ``loader``: a loader that can assign the
    tensors it is given (one with Dynamic VRAM's ``disable_dynamic`` switch) gets copies of those that are the pack
    model's own, so that neither a later training step nor ComfyUI's memory pinning touches the other's weights. A
    loader that copies (ComfyUI 0.8) gets them as they are, so the weights are never held three times."""
    import inspect

    if "disable_dynamic" not in inspect.signature(loader).parameters:
        return state
    ours = {t.untyped_storage().data_ptr() for part in model.parts().values()
            for t in [*part.parameters(), *part.buffers()]}
    return {k: v.clone() if v.untyped_storage().data_ptr() in ours else v for k, v in state.items()}


class FT_ApplyLoRAToComfy:
    DESCRIPTION = ("Apply a LoRA trained in this graph (LoRA, LoHa, LoKr or DoRA) to ComfyUI's MODEL and CLIP through "
                   "ComfyUI's own LoRA loading, so the native KSampler samples with it: the same result as saving "
                   "it with Save LoRA and loading the file with LoraLoader, without the file. A LoRA with layers the "
                   "model lacks (trained on another family) is an error naming them." + ONLY_IN_COMFYUI)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA patched in (ComfyUI's own patches, as LoraLoader's).",
                       "The text encoder with the LoRA's text-encoder layers patched in.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": LINK("MODEL", "ComfyUI's diffusion model (e.g. from Load Checkpoint)."),
            "clip": LINK("CLIP", "ComfyUI's text encoder (e.g. from Load Checkpoint)."),
            "lora": LINK("FT_LORA", "A LoRA from a training node of this pack."),
            "strength_model": FLOAT(1.0, -100.0, 100.0, "How strongly to change the diffusion model (1 = as "
                                    "trained, 0 = not at all, negative = the opposite), as in LoraLoader."),
            "strength_clip": FLOAT(1.0, -100.0, 100.0, "How strongly to change the text encoder, as in LoraLoader."),
        }}

    @checked
    def execute(self, model, clip, lora, strength_model, strength_clip):
        if lora is None:
            raise ValueError("lora: there is no LoRA: the DreamBooth run was in full mode, whose weights are in its "
                             "model output (take that to ComfyUI with Model to ComfyUI), or switch it to lora mode")
        import comfy.lora
        import comfy.sd

        keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
        missing = [m for m in lora.modules() if m not in keys]
        if missing:
            from ..trainers.families.registry import family_of_lora

            fam = family_of_lora(lora)
            raise ValueError(f"{len(missing)} of the {len(lora.modules())} layers of LoRA {lora.name!r} (trained on "
                             f"the {fam.label if fam else 'unknown'} family) are not in ComfyUI's {type(model.model.model_config).__name__} "
                             f"model, e.g. {missing[0]}: apply a LoRA to a model of the family it was trained on")
        state = {k: v.detach().contiguous().cpu() for k, v in lora.state.items()}  # as Save LoRA writes it
        return comfy.sd.load_lora_for_models(model, clip, state, strength_model, strength_clip)


class FT_ModelFromComfy:
    DESCRIPTION = ("Take the model ComfyUI's graph holds as an FT_MODEL to train or sample: a checkpoint from Load "
                   "Checkpoint, a merge made with ComfyUI's model-merging nodes, a model with LoRAs applied; their "
                   "patches are baked in, and nothing is read from disk again. SD 1.x, 2.x, SDXL and Z-Image (from "
                   "UNETLoader, CLIPLoader with Qwen3-4B, and VAELoader); a model of another family (SD3, Flux, the "
                   "SDXL refiner ...) is an error naming it. Only weights travel: "
                   "patches that change how the model runs (FreeU, hooks, a CLIP Set Last Layer) do not. Runs trained "
                   "on it record the model as comfy:<ComfyUI's model class> with a fingerprint of its weights."
                   + ONLY_IN_COMFYUI)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same weights as a pack model, for the training nodes and Sample.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("MODEL", "ComfyUI's diffusion model (Load Checkpoint, a merge, ...)."),
                "clip": LINK("CLIP", "ComfyUI's text encoder belonging to it."),
                "vae": LINK("VAE", "ComfyUI's VAE belonging to it."),
            },
            "optional": {
                "device": COMBO(DEVICES, "Where the pack's model runs: auto picks the GPU when there is one."),
                "dtype": COMBO(DTYPES, "Weight precision: auto is fp16 on a GPU for SD models and fp32 on the CPU."),
                "offload": COMBO(OFFLOAD, "On a GPU. auto: the weights wait in CPU memory and visit the GPU only "
                                 "while they sample or train (as in Load Base Model); off: they stay on the GPU."),
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model, clip, vae, device="auto", dtype="auto", offload="auto"):
        from ..trainers.families.registry import family_of_comfy_class

        config = type(model.model.model_config).__name__
        if family_of_comfy_class(config) is not None:  # a family whose parts keep their own layouts (Z-Image)
            return (transformer_from_comfy(model, clip, vae, config, device, dtype, offload),)
        from ..trainers.model.loading import model_from_single_file_state

        unet = {"model.diffusion_model." + k: v for k, v in model.model.diffusion_model.state_dict().items()}
        reason = unsupported_reason(unet, config)  # checked on the names before anything is loaded
        prediction = comfy_prediction(model)
        if reason is None and prediction is None:
            kinds = [c.__name__ for c in type(model.get_model_object("model_sampling")).__mro__[1:3]]
            reason = (f"ComfyUI's model is {config}, sampled as {' + '.join(kinds)}; the pack trains epsilon and "
                      "v-prediction models")
        if reason:
            raise ValueError(reason)
        state = comfy_checkpoint(model, clip, vae)
        state = {k: v for k, v in state.items() if k.startswith(
            ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")) or k in MARKERS}
        # borrowed: weights of our own, as ComfyUI patches and restores its weights in place when a LoRA or merge runs
        # the prediction: what ComfyUI samples it as; offloaded, the pack's copy never joins ComfyUI's on the GPU
        ft = model_from_single_file_state(state, f"comfy:{config}", sd1_tokenizer_dir(), device, dtype,
                                          prediction, borrowed=True, offload=offload == "auto")
        ft.prediction_source = "as ComfyUI samples it"
        del state
        return (ft,)


def transformer_from_comfy(model, clip, vae, config: str, device: str, dtype: str, offload: str):
    """A Z-Image FT_MODEL from ComfyUI's MODEL, CLIP and VAE: the whole checkpoint ComfyUI's CheckpointSave would
    write of them (patches baked in), each part copied into the pack's own modules."""
    from ..trainers.model.zimage_files import zimage_from_states

    if not hasattr(clip.cond_stage_model, "qwen3_4b"):
        raise ValueError(f"clip: ComfyUI's model is {config}, whose prompts are read by Qwen3-4B; this CLIP holds "
                         f"{type(clip.cond_stage_model).__name__}: load qwen_3_4b.safetensors with CLIPLoader "
                         "(type lumina2)")
    state = comfy_checkpoint(model, clip, vae)
    ft = zimage_from_states(state, state, state, f"comfy:{config}", qwen_tokenizer_dir(), device, dtype,
                            offload == "auto", what=f"ComfyUI's {config} model")
    del state
    return ft


def comfy_state(model) -> dict:
    """What ComfyUI's checkpoint loader gets from a pack model: Save Checkpoint's single-file state dict (live
    adapters merged) in the model's own precision, without the rows Textual Inversion added to the token
    embedding (ComfyUI's CLIP has the fixed vocabulary of its family; its words come as embedding:<name>)."""
    from ..trainers.model.checkpoint import to_single_file

    if not model.family.config:
        raise ValueError(f"model: the {model.family.label} has no ComfyUI equivalent; SD 1.x, 2.x, SDXL and "
                         "Z-Image models do (save this one with Save Checkpoint as a diffusers folder)")
    state = to_single_file(model, model.dtype)
    base = model.tokenizer.vocab_size  # the vocabulary without added words (SDXL: both encoders share it)
    for key in [k for k in state if k.endswith("token_embedding.weight") and state[k].shape[0] > base]:
        host.log.warning("Model to ComfyUI: the Textual Inversion words %s stay behind (ComfyUI's CLIP has a fixed "
                         "vocabulary): save them with Save Embedding and write embedding:<name> in the prompt",
                         ", ".join(model.token_vectors) or f"({state[key].shape[0] - base} added tokens)")
        state[key] = state[key][:base]
    return state


class FT_ModelToComfy:
    DESCRIPTION = ("Hand a pack model (a full fine-tune, a model with LoRAs merged by Apply LoRA, any SD 1.x/2.x/XL "
                   "or Z-Image FT_MODEL) to ComfyUI as MODEL, CLIP and VAE, so its native samplers, upscalers and "
                   "Save Checkpoint work on it: the same as saving it with Save Checkpoint and loading the file with "
                   "Load Checkpoint, without the file (a Z-Image: the same as UNETLoader, CLIPLoader and VAELoader on "
                   "its three files). A word added by Textual Inversion does not travel into ComfyUI's "
                   "CLIP this way: save it with Save Embedding and write embedding:<name> in the prompt. The toy "
                   "models have no ComfyUI equivalent." + ONLY_IN_COMFYUI)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("ComfyUI's diffusion model with the pack model's weights (adapters merged).",
                       "ComfyUI's text encoder (TI words stay behind: use Save Embedding and embedding:<name>).",
                       "ComfyUI's VAE.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": LINK("FT_MODEL", "The pack model to hand to ComfyUI's own nodes.")}}

    @checked
    def execute(self, model):
        return to_comfy(model, [str(p) for p in host.model_dirs("embeddings")])


def to_comfy(model, embedding_directory: list[str]) -> tuple:
    """ComfyUI's (MODEL, CLIP, VAE) of a pack model, as Load Checkpoint gives them from Save Checkpoint's file
    (:func:`comfy_state`), predicting what the pack's model predicts; its CLIP finds embedding:<name> in
    ``embedding_directory``."""
    state = comfy_state(model)
    import comfy.sd

    state = unaliased(state, model, comfy.sd.load_state_dict_guess_config)
    out = comfy.sd.load_state_dict_guess_config(state, output_vae=True, output_clip=True,
                                                embedding_directory=embedding_directory)
    if out is None:
        raise RuntimeError(f"ComfyUI did not recognise {model!r} as a checkpoint")
    comfy_model, clip, vae = out[:3]
    wanted = model.prediction_type
    if wanted in PREDICTIONS.values() and comfy_prediction(comfy_model) != wanted:
        # ComfyUI guesses SD 2.x's from the weights; the pack knows (a flow model's sampling is its family's)
        import comfy.model_sampling as ms

        kind = {"epsilon": ms.EPS, "v_prediction": ms.V_PREDICTION}[wanted]
        sampling = type("ModelSampling", (ms.ModelSamplingDiscrete, kind), {})
        comfy_model.add_object_patch("model_sampling", sampling(comfy_model.model.model_config))
    return comfy_model, clip, vae
