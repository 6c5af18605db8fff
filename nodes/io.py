"""finetune/io: save adapters where ComfyUI's loaders find them, and apply them to a model."""
from __future__ import annotations

from . import host, load_check
from .base import COMBO, FLOAT, LINK, ROOT_CATEGORY, STRING, checked, torch_call

CATEGORY = f"{ROOT_CATEGORY}/io"
NONE = "none"


def lora_choices() -> list[str]:
    return [NONE] + host.list_models("loras")


def read_model_file(kind: str, name: str, what: str):
    """(tensors, metadata, path) of a safetensors file from one of ComfyUI's model folders, its contents checked
    (a whole file, finite values); other formats are refused because they can run code when opened."""
    from ..trainers.runs import reading

    path = host.model_path(kind, name)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{what} {name!r}: only .safetensors files are loaded ({path.suffix} files can run code)")
    state, meta = reading.read(path, what)
    return state, meta, path


def read_lora_file(name: str):
    from ..trainers.methods.lora import lora_from_state

    state, meta, path = read_model_file("loras", name, "lora_name")
    return lora_from_state(state, path.stem, meta)


class FT_SaveLoRA:
    DESCRIPTION = ("Save a LoRA into ComfyUI's models/loras folder as kohya-layout safetensors (lora_unet_*, "
                   "lora_te_*, .alpha) with ss_* metadata and the full training config, so ComfyUI's LoraLoader, "
                   "diffusers, A1111 and Forge all load it. Never overwrites: a counter is added. Then the file is read "
                   "back: inside ComfyUI by its own LoRA loading, each key matched to a weight of a model of the "
                   "family it was trained on ('checked by ComfyUI: N of N keys applied'); outside it by the pack's "
                   "reader. A key ComfyUI would ignore fails the node by name (the file is kept).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside the loras folder (as LoraLoader lists it).",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": LINK("FT_LORA", "The LoRA to save (from a training node)."),
            "filename": STRING("finetune/my_lora", "Subfolder and name inside models/loras (no extension)."),
        }}

    @checked
    def execute(self, lora, filename):
        from ..trainers.runs.export import lora_metadata, save_unique

        if lora is None:
            raise ValueError("lora: there is no LoRA to save: the DreamBooth run was in full mode, whose weights are "
                             "in its model output (save that with a checkpoint node), or switch it to lora mode")

        root, rel = host.save_folder("loras", filename)
        path = save_unique(root / rel.parent, rel.name, lora.state, lora_metadata(lora))
        name = path.relative_to(root).as_posix()
        host.log.info("saved LoRA %s (%d tensors)", name, len(lora.state))
        checked = load_check.check_lora(path, lora)
        return {"ui": {"text": [f"saved loras/{name}", str(checked)]}, "result": (name,)}


class FT_ApplyLoRA:
    DESCRIPTION = ("Apply a LoRA to a model with a strength: a trained one (lora input) or a file from "
                   "models/loras (lora_name). The input model is not changed: the result shares its weights and "
                   "adds the LoRA live (its own memory is the LoRA's few MB, not a copy of the model). Chain several "
                   "to stack LoRAs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied (sharing the input's weights).",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The model to apply the LoRA to."),
                "lora_name": COMBO(lora_choices(), "A LoRA file from models/loras (ignored when the lora input is "
                                   "connected)."),
                "strength": FLOAT(1.0, -10.0, 10.0, "How strongly to apply it (1 = as trained, 0 = not at all).",
                                  step=0.05),
            },
            "optional": {"lora": LINK("FT_LORA", "A LoRA from a training node (takes precedence over lora_name).")},
        }

    @torch_call
    def execute(self, model, lora_name, strength, lora=None):
        from ..trainers.methods.lora import apply_lora

        if lora is None:
            if lora_name == NONE:
                raise ValueError("no LoRA given: connect the lora input or choose a file in lora_name")
            lora = read_lora_file(lora_name)
        return (apply_lora(model, lora, strength),)


def embedding_choices() -> list[str]:
    return [NONE] + host.list_models("embeddings")


def read_embedding_file(name: str):
    from ..trainers.methods.textual_inversion import embedding_from_state

    state, meta, path = read_model_file("embeddings", name, "embedding_name")
    return embedding_from_state(state, path.stem, meta)


class FT_SaveEmbedding:
    DESCRIPTION = ("Save a Textual Inversion embedding into ComfyUI's models/embeddings folder as safetensors with one "
                   "tensor 'emb_params' (vectors x width; SDXL: 'clip_l' and 'clip_g', one per text encoder): use it "
                   "in any ComfyUI prompt as embedding:<name>, in A1111 by its file name, or with diffusers' "
                   "load_textual_inversion. Never overwrites. Then the file is read back: inside ComfyUI as its tokenizer "
                   "reads embedding:<name> in a prompt of the family the vectors fit, each vector as saved "
                   "('checked by ComfyUI: N of N vectors applied'); outside it by the pack's reader.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("embedding_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside the embeddings folder (write embedding:<name> in prompts).",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embedding": LINK("FT_EMBEDDING", "The embedding to save (from Train Textual Inversion)."),
            "filename": STRING("finetune/my_embedding", "Subfolder and name inside models/embeddings."),
        }}

    @checked
    def execute(self, embedding, filename):
        from ..trainers.runs.export import embedding_metadata, save_unique

        root, rel = host.save_folder("embeddings", filename)
        path = save_unique(root / rel.parent, rel.name, embedding.tensors(),
                           embedding_metadata(embedding))
        name = path.relative_to(root).as_posix()
        checked = load_check.check_embedding(path, root, embedding)
        return {"ui": {"text": [f"saved embeddings/{name}: write embedding:{name.removesuffix('.safetensors')} "
                                "in a ComfyUI prompt", str(checked)]}, "result": (name,)}


class FT_ApplyEmbedding:
    DESCRIPTION = ("Add a Textual Inversion embedding to a model under a word: a trained one (embedding input) or a "
                   "file from models/embeddings. The input model is not changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model that knows the word (sharing the input's weights).",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The model to add the word to."),
                "embedding_name": COMBO(embedding_choices(), "An embedding file from models/embeddings (ignored "
                                        "when the embedding input is connected)."),
                "token": STRING("", "The word to use in prompts (empty: the embedding's own token, or the file "
                                "name in brackets)."),
            },
            "optional": {"embedding": LINK("FT_EMBEDDING", "A trained embedding (takes precedence).")},
        }

    @torch_call
    def execute(self, model, embedding_name, token, embedding=None):
        from ..trainers.methods.textual_inversion import apply_embedding

        if embedding is None:
            if embedding_name == NONE:
                raise ValueError("no embedding given: connect the embedding input or choose a file")
            embedding = read_embedding_file(embedding_name)
            if not token.strip() and not embedding.metadata.get("token"):
                token = f"<{embedding.name}>"
        return (apply_embedding(model, embedding, token.strip() or None),)


SAVE_FORMATS = ["single file (.safetensors)", "diffusers folder"]
SAVE_DTYPES = ["fp16", "bf16", "fp32"]


class FT_SaveCheckpoint:
    DESCRIPTION = ("Save a whole model (e.g. from DreamBooth's full mode): as one original-layout .safetensors file in "
                   "models/checkpoints, which ComfyUI's Load Checkpoint, A1111 and diffusers' from_single_file read "
                   "(SD 1.x, 2.x and SDXL models; a Z-Image's transformer alone goes to models/diffusion_models in "
                   "ComfyUI's layout, for its Load Diffusion Model), or as a diffusers folder in models/diffusers (any "
                   "family, the toys too). Never overwrites. Then it is read back: inside ComfyUI by Load Checkpoint's own loader (a "
                   "single file) or DiffusersLoader's (a folder), every weight as saved (one more load of the model); "
                   "outside it, and for the toys, by the pack's reader, every tensor of every part.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("name",)
    OUTPUT_TOOLTIPS = ("The saved file or folder name, as ComfyUI's loaders list it.",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": LINK("FT_MODEL", "The model to save."),
            "filename": STRING("finetune/my_model", "Subfolder and name inside models/checkpoints (or "
                               "models/diffusers for a folder)."),
            "format": COMBO(SAVE_FORMATS, "One .safetensors file (SD 1.x/2.x/XL; Z-Image: its transformer in "
                            "models/diffusion_models), or a diffusers folder (any model)."),
            "dtype": COMBO(SAVE_DTYPES, "Precision of the saved weights (fp16 halves the size)."),
        }}

    @torch_call
    def execute(self, model, filename, format, dtype):
        import json

        import torch

        from ..trainers.model.checkpoint import save_diffusers, to_denoiser_file, to_single_file
        from ..trainers.runs.export import save_unique, unique_path

        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        if format == SAVE_FORMATS[0] and model.family.denoiser_part == "transformer":  # Z-Image: the DiT alone
            root, rel = host.save_folder("diffusion_models", filename)
            tensors = to_denoiser_file(model, dt)
            path = save_unique(root / rel.parent, rel.name, tensors, {
                "modelspec.architecture": model.family.architecture, "finetune_history": json.dumps(model.history)})
            checked = [str(load_check.check_denoiser_file(path, tensors, model.family))]
        elif format == SAVE_FORMATS[0]:
            root, rel = host.save_folder("checkpoints", filename)
            tensors = to_single_file(model, dt)
            meta = {"modelspec.architecture": model.family.architecture,
                    "finetune_history": json.dumps(model.history)}
            path = save_unique(root / rel.parent, rel.name, tensors, meta)
            checked = [str(load_check.check_checkpoint(path, tensors, model.family))]
        else:
            root, rel = host.save_folder("diffusers", filename)
            (root / rel.parent).mkdir(parents=True, exist_ok=True)
            path = save_diffusers(model, unique_path(root / rel.parent, rel.name, ""), dt)
            checked = [str(load_check.check_folder(path, model, dt))]
        name = path.relative_to(root).as_posix()
        return {"ui": {"text": [f"saved {root.name}/{name}", *checked]}, "result": (name,)}
