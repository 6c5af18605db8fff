"""finetune/io: save adapters where ComfyUI's loaders find them, and apply them to a model."""
from __future__ import annotations

from . import host
from .base import COMBO, FLOAT, LINK, ROOT_CATEGORY, STRING, torch_call

CATEGORY = f"{ROOT_CATEGORY}/io"
NONE = "none"


def lora_choices() -> list[str]:
    return [NONE] + host.list_models("loras")


def read_lora_file(name: str):
    from safetensors import safe_open

    from ..trainers.lora import lora_from_state

    path = host.model_path("loras", name)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"lora_name {name!r}: only .safetensors LoRAs are loaded (other formats can run code)")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    return lora_from_state(state, path.stem, meta)


class FT_SaveLoRA:
    DESCRIPTION = ("Save a LoRA into ComfyUI's models/loras folder as kohya-layout safetensors (lora_unet_*, "
                   "lora_te_*, .alpha) with ss_* metadata and the full training config, so ComfyUI's LoraLoader, "
                   "diffusers, A1111 and Forge all load it. Never overwrites: a counter is added.")
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

    def execute(self, lora, filename):
        from ..trainers.export import lora_metadata, unique_path, write_safetensors

        rel = host.safe_relative(filename.strip().removesuffix(".safetensors"), "filename")
        dirs = host.model_dirs("loras")
        if not dirs:
            raise FileNotFoundError("ComfyUI has no 'loras' model folder configured")
        root = dirs[0]
        for _ in range(5):  # another writer may take the name between the check and the rename
            path = unique_path(root / rel.parent, rel.name, ".safetensors")
            try:
                write_safetensors(path, lora.state, lora_metadata(lora))
                break
            except FileExistsError:
                continue
        name = path.relative_to(root).as_posix()
        host.log.info("saved LoRA %s (%d tensors)", name, len(lora.state))
        return {"ui": {"text": [f"saved loras/{name}"]}, "result": (name,)}


class FT_ApplyLoRA:
    DESCRIPTION = ("Apply a LoRA to a model with a strength: a trained one (lora input) or a file from "
                   "models/loras (lora_name). The input model is not changed; a copy with the LoRA merged in is "
                   "returned. Chain several to stack LoRAs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model with the LoRA merged in.",)
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
        from ..trainers.lora import apply_lora

        if lora is None:
            if lora_name == NONE:
                raise ValueError("no LoRA given: connect the lora input or choose a file in lora_name")
            lora = read_lora_file(lora_name)
        return (apply_lora(model.clone(), lora, strength),)
