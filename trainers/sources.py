"""A base model from its source string: the name Load Base Model offers and config.json records.

A source is a built-in toy (:data:`BUILTINS`: ``toy (built-in)`` or ``toy``, ``toy SDXL (built-in)`` or ``toy_xl``,
``toy audio (built-in)`` or ``toy_audio``, ``toy Z-Image (built-in)`` or ``toy_zimage``),
``diffusers/<folder>`` or ``checkpoints/<file>``. The library never asks ComfyUI where model folders are: the caller
gives ``resolve(kind, name) -> path`` (the nodes and the shell pass nodes/host.py's ``model_path``) and, for
single-file checkpoints, ``tokenizer_dir`` (ComfyUI's shipped SD 1.x/2.x CLIP vocabulary, when there is one).
Importing this module loads no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .toy.loader import TOY_AUDIO_SOURCE, TOY_SOURCE, TOY_XL_SOURCE, load_toy_audio_model, load_toy_model
from .toy.loader import TOY_ZIMAGE_SOURCE, load_toy_xl_model, load_toy_zimage_model

OFFLOAD = ["auto", "off"]
PREDICTION = ["auto", "epsilon", "v_prediction"]  # auto + trainers.families.PREDICTIONS (tested)


@dataclass(frozen=True)
class Builtin:
    """A model that ships with the pack: how config.json names it, the short name also accepted, how errors name
    it, and its loader (weights on the CPU)."""

    source: str
    short: str
    which: str
    load: Callable


#: the built-in toys by their source name (the Load Base Model choice), in the order the node lists them
BUILTINS: dict[str, Builtin] = {b.source: b for b in (
    Builtin(TOY_SOURCE, "toy", "toy model", load_toy_model),
    Builtin(TOY_XL_SOURCE, "toy_xl", "toy SDXL", load_toy_xl_model),
    Builtin(TOY_AUDIO_SOURCE, "toy_audio", "toy audio model", load_toy_audio_model),
    Builtin(TOY_ZIMAGE_SOURCE, "toy_zimage", "toy Z-Image", load_toy_zimage_model))}


def builtin(model_name: str) -> Builtin | None:
    """The built-in ``model_name`` names (by its source or short name), or None."""
    return next((b for b in BUILTINS.values() if model_name in (b.source, b.short)), None)


def load_base_model(model_name: str, device: str = "auto", dtype: str = "auto", offload: str = "auto",
                    prediction: str = "auto", *, resolve: Callable[[str, str], Path] | None = None,
                    tokenizer_dir: Callable[[str], str | None] | None = None):
    """The model ``model_name`` names, remembering the name as its source (config.json records it). On a GPU with
    ``offload`` auto its weights wait in CPU memory and visit the GPU while they run. ``prediction`` auto: what the
    model predicts comes from its weights (a single file) or its scheduler config (a diffusers folder).

    ``resolve(kind, name)`` finds a ``diffusers`` folder or ``checkpoints`` file in the model folders (raising
    FileNotFoundError naming where it looked); ``tokenizer_dir(folder)`` gives the folder of a vocabulary ComfyUI
    ships (``sd1_tokenizer`` for single-file SD 1.x/2.x checkpoints, ``text_encoders/qwen25_tokenizer`` for a whole
    Z-Image checkpoint), or None; it is asked only when one is loaded."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD)}")
    if prediction not in PREDICTION:
        raise ValueError(f"prediction {prediction!r} is not one of {', '.join(PREDICTION)}")
    found = builtin(model_name)
    offloaded = offload == "auto"  # offloaded: never all on the GPU
    if found is not None:
        model = _load_builtin(found, device, dtype, prediction, offloaded)
    else:
        model = _load_file(model_name, device, dtype, prediction, offloaded, resolve, tokenizer_dir)
    model.source = found.source if found is not None else model_name
    return model


def _load_builtin(toy: Builtin, device: str, dtype: str, prediction: str, offload: bool):
    from .model import loading

    dev = loading.resolve_device(device)
    model = toy.load()
    if prediction not in ("auto", model.prediction_type):
        raise ValueError(f"prediction {prediction!r}: the built-in {toy.which} was trained to predict "
                         f"{model.prediction_type}; leave prediction on auto")
    model.prediction_source = "the toy's own"
    return model.to(dev, loading.resolve_dtype(dtype, dev, model.family), offload=offload)


def _load_file(model_name: str, device: str, dtype: str, prediction: str, offload: bool,
               resolve: Callable[[str, str], Path] | None, tokenizer_dir: Callable[[str], str | None] | None):
    from .model import loading

    kind, _, name = model_name.partition("/")
    if kind in ("diffusers", "checkpoints") and name and resolve is None:
        raise ValueError(f"model_name {model_name!r} names a model file: loading it needs resolve(kind, name), "
                         "which finds it in the model folders")
    if kind == "diffusers" and name:
        folder = resolve("diffusers", name)
        if _pipeline_class(folder) == "ZImagePipeline":
            from .model.zimage_files import load_zimage_folder

            if prediction != "auto":
                raise ValueError(f"prediction {prediction!r}: {name} is a Z-Image (a flow-matching model); leave "
                                 "prediction on auto")
            return load_zimage_folder(folder, device, dtype, offload)
        return loading.load_diffusers_folder(folder, device, dtype, prediction, offload)
    if kind == "checkpoints" and name:
        path = resolve("checkpoints", name)
        if _is_whole_zimage(path):
            from .model.zimage_files import load_zimage_checkpoint

            if prediction != "auto":
                raise ValueError(f"prediction {prediction!r}: {name} is a Z-Image (a flow-matching model); leave "
                                 "prediction on auto")
            vocabulary = tokenizer_dir("text_encoders/qwen25_tokenizer") if tokenizer_dir else None
            return load_zimage_checkpoint(path, vocabulary, device, dtype, offload)
        return loading.load_single_file(path, tokenizer_dir("sd1_tokenizer") if tokenizer_dir else None,
                                        device, dtype, prediction, offload)
    raise ValueError(f"model_name {model_name!r} is not '{TOY_SOURCE}', 'diffusers/<folder>' or "
                     "'checkpoints/<file>'")


def _is_whole_zimage(path: Path) -> bool:
    """Whether a checkpoint file is a whole Z-Image (ComfyUI's CheckpointSave layout), from its header's names."""
    from .model.zimage_files import CHECKPOINT_KEY
    from .runs.reading import header

    return path.suffix.lower() == ".safetensors" and CHECKPOINT_KEY in header(path, "checkpoint")[0]


def _pipeline_class(folder: Path) -> str:
    """The pipeline class a diffusers folder's model_index.json names ("" when it has none)."""
    import json

    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
