"""The graph that resumes a run, rebuilt from its folder (the runs panel's Resume: ``GET
/finetune/runs/<run>/resume_workflow``).

config.json names the method, its whole recipe and the base model (the Load Base Model choice); the dataset's
loader inputs are not recorded, only its name, source and options, and the very pictures it trained on are kept in
``dataset/``. So the dataset node is rebuilt from what the source says (a toy-world set, or a folder of ComfyUI's
input folder), run, and compared with the snapshot picture by picture and caption by caption: the graph is offered
only when it gives back exactly the dataset the run trained on. Otherwise the answer says why, and the shell's
``python -m comfyui_finetune train <run>/config.json --resume`` (which trains on the snapshot itself) is the way.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
#: the dataset nodes' options (nodes.datasets.OPTIONS) as the snapshot records them
DATASET_OPTIONS = ("repeats", "resolution", "bucketing", "no_upscale", "caption_dropout", "shuffle_captions",
                   "keep_tokens")


def training_nodes() -> dict[str, str]:
    """method -> the name of the node that trains it, from each training node's own ``METHOD``."""
    from . import train

    return {cls.METHOD: name for name, cls in vars(train).items()
            if isinstance(cls, type) and issubclass(cls, train.Trainer) and cls is not train.Trainer}


class NotFaithful(Exception):
    """No graph gives back this run's training exactly; the message says what is missing."""


def resume_workflow(folder: Path) -> dict:
    """``{"run", "prompt", "name", "shell", "reason"}``: ``prompt`` is an API-format graph (Load Base Model, the
    dataset, the training node with ``resume_run`` set, a loss plot) or None, with ``reason`` saying why."""
    run = folder.name
    shell = f"python -m comfyui_finetune train output/finetune/{run}/config.json --resume"
    try:
        prompt = build(folder)
    except NotFaithful as e:
        return {"run": run, "prompt": None, "name": None, "shell": shell, "reason": str(e)}
    return {"run": run, "prompt": prompt, "name": f"resume {run}", "shell": shell, "reason": None}


def build(folder: Path) -> dict:
    from ..trainers.config.recipes import read_config

    try:
        recipe, cfg = read_config(folder / "config.json")
    except (OSError, ValueError) as e:
        raise NotFaithful(f"config.json cannot be read back: {e}") from None
    node = training_nodes().get(recipe.method)
    if node is None:
        raise NotFaithful(f"no training node for method {recipe.method!r}")
    model = cfg.get("model") or {}
    if model.get("history") or model.get("token_vectors"):
        raise NotFaithful("the base model was itself a trained model (a LoRA, an embedding or an earlier stage was "
                          "applied to it); that part of the graph is not recorded")
    if recipe.keep_best != "off":
        raise NotFaithful("keep_best needs the CLIP scorer the run used, which config.json does not record")
    if recipe.method == "dreambooth":
        subjects = cfg.get("subjects") or []
        if len(subjects) != 1:
            raise NotFaithful(f"the run trained {len(subjects)} DreamBooth subjects; their chain is not recorded")
        if recipe.prior_preservation:
            raise NotFaithful("with prior preservation config.json does not say which class pictures were given "
                              "and which generated")
    if recipe.method == "controlnet":
        cn = cfg.get("controlnet") or {}
        if cn.get("condition") != recipe.preprocessor or cn.get("init", "base UNet encoder") != "base UNet encoder":
            raise NotFaithful("the ControlNet trained on paired condition pictures or continued a loaded ControlNet; "
                              "those inputs are not recorded")
    prompt = {"1": _base_model(model)}
    prompt.update(_dataset(folder / "dataset", recipe.method))
    last = str(len(prompt))
    trainer = _node_class(node)
    names = [*trainer.INPUT_TYPES()["required"], *trainer.INPUT_TYPES()["optional"]]
    inputs = {"model": ["1", 0], "dataset": [last, 0]}
    inputs.update({n: getattr(recipe, n) for n in names if n in recipe.options()})
    inputs["resume_run"] = folder.name
    train_id, plot_id, show_id = (str(len(prompt) + i) for i in (1, 2, 3))
    prompt[train_id] = {"class_type": node, "inputs": inputs,
                        "_meta": {"title": f"Resume {folder.name} (raise steps to train further)"}}
    log_out = list(trainer.RETURN_TYPES).index("FT_TRAINING_LOG")
    prompt[plot_id] = {"class_type": "FT_LossPlot", "inputs": {"log": [train_id, log_out], "width": 768,
                                                               "height": 384}, "_meta": {"title": "Loss"}}
    prompt[show_id] = {"class_type": "PreviewImage", "inputs": {"images": [plot_id, 0]},
                       "_meta": {"title": "Loss curve"}}
    return prompt


def _node_class(name: str) -> type:
    from . import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS[name]


def _base_model(model: dict) -> dict:
    source = model.get("source") or ""
    choices = _node_class("FT_LoadBaseModel").INPUT_TYPES()["required"]["model_name"][0]
    if source not in choices:
        raise NotFaithful(f"the base model {source!r} is not among Load Base Model's choices now "
                          f"({len(choices)} there): put it back in the models folder")
    return {"class_type": "FT_LoadBaseModel", "_meta": {"title": f"Base model: {source}"},
            "inputs": {"model_name": source, "device": "auto", "dtype": DTYPES.get(model.get("dtype"), "auto")}}


# ---------------------------------------------------------------------------------------------------- dataset --
def _snapshot(folder: Path) -> dict:
    try:
        index = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise NotFaithful("the run folder has no readable dataset snapshot (dataset/dataset.json)") from None
    if set(index) - {"name", "source", "options", "examples"}:
        raise NotFaithful("the dataset snapshot holds extra picture sets (class pictures) a graph does not record")
    return index


def _dataset(folder: Path, method: str) -> dict:
    """The dataset nodes ("2", and "3" for Augment) whose output equals the snapshot in ``folder``."""
    index = _snapshot(folder)
    source, name, opts = str(index.get("source", "")), str(index.get("name", "")), dict(index.get("options") or {})
    options = {k: opts[k] for k in DATASET_OPTIONS if k in opts}
    if method == "controlnet":
        options.pop("caption_dropout", None)  # the ControlNet recipe's own caption_dropout replaces it
    examples = index.get("examples") or []
    if any("condition" in r or "mask" in r for r in examples):
        raise NotFaithful("the dataset had paired conditions or masks, which its loader inputs do not record")
    captions = [str(r.get("caption", "")) for r in examples]
    check_captions = method != "dreambooth"  # DreamBooth captions every picture with its instance prompt
    toy = re.fullmatch(r"toy world seed (\d+)", source)
    candidates = _toy_candidates(name, int(toy[1]), captions) if toy else _folder_candidates(source, captions)
    if not candidates:
        raise NotFaithful(f"the dataset {name!r} (source {source!r}) came from a node whose inputs are not recorded "
                          "(pictures from the graph, or a folder no longer in ComfyUI's input folder)")
    pictures = None
    for class_type, inputs in candidates:
        ds = _run_dataset(class_type, {**inputs, **options})
        if ds is None:
            continue
        pictures = pictures if pictures is not None else [_picture(folder / r["file"]) for r in examples]
        if _same(ds, pictures, captions if check_captions else None):
            nodes = {"2": {"class_type": class_type, "inputs": {**inputs, **options},
                           "_meta": {"title": f"Dataset {name} (as the run trained on it)"}}}
            aug = opts.get("augment")
            if aug:
                nodes["3"] = {"class_type": "FT_Augment", "_meta": {"title": "Augment"},
                              "inputs": {"dataset": ["2", 0], **{k: aug[k] for k in
                                                                 ("flip", "crop_scale", "color_jitter")}}}
            return nodes
    raise NotFaithful(f"the dataset {name!r} (source {source!r}) cannot be rebuilt as it was: its pictures or "
                      "captions differ from the run's snapshot now")


def _toy_candidates(name: str, seed: int, captions: list[str]) -> list[tuple[str, dict]]:
    from ..trainers.toy.world_names import ANY, COLORS, GEOMETRIES, SHAPES

    if len(set(captions)) > 1 or not captions:
        return []
    out = []
    for color in [*COLORS, ANY]:
        for shape in [*SHAPES, ANY]:
            tag = f"{'any' if color == ANY else color}-{'any' if shape == ANY else shape}"
            if name == f"toy-{tag}":
                out += [("FT_ToyDataset", {"color": color, "shape": shape, "count": len(captions),
                                           "caption": captions[0], "seed": seed, "geometry": g}) for g in GEOMETRIES]
    return out


def _folder_candidates(source: str, captions: list[str]) -> list[tuple[str, dict]]:
    """Load Image Dataset on each input subfolder named ``source``; pictures without a caption file take the
    caption input, so it is the caption those pictures had (tried: each distinct caption, then the default)."""
    from . import host

    folders = [f for f in host.input_subfolders() if f.rsplit("/", 1)[-1] == source]
    texts = list(dict.fromkeys(captions))[:3] + ["a photo of {token}"]
    return [("FT_LoadImageDataset", {"folder": f, "caption": c, "token": "sks"}) for f in folders[:4] for c in texts]


def _run_dataset(class_type: str, inputs: dict):
    try:
        out = _node_class(class_type)().execute(**inputs)
    except (OSError, ValueError, TypeError, KeyError):  # a folder that changed or vanished: not the run's dataset
        return None
    return out[0]


def _picture(path: Path):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError:
        raise NotFaithful(f"the dataset snapshot lacks {path.name}") from None


def _same(ds, pictures: list, captions: list[str] | None) -> bool:
    import numpy as np

    if len(ds.examples) != len(pictures):
        return False
    for i, e in enumerate(ds.examples):
        if captions is not None and e.caption != captions[i]:
            return False
        if e.image.shape != pictures[i].shape or not np.array_equal(e.image, pictures[i]):
            return False
    return True
