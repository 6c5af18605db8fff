"""Every file a save node writes is read back before anyone shares it ("lora key not loaded" is found here, not by
the people who downloaded it).

Inside ComfyUI the reader is ComfyUI's own loader for the kind: a LoRA's keys go through ``comfy.lora.load_lora``
with the key map ComfyUI builds for a model of the family it was trained on (``model_lora_keys_unet`` and
``_clip``, on a weightless copy of ComfyUI's model: nothing is allocated), and each patch must land on a weight of
that model, as ``load_lora_for_models`` applies it; an embedding goes through ComfyUI's tokenizer as
``embedding:<name>`` (its ``load_embed``); a checkpoint through ``load_checkpoint_guess_config``, a diffusers
folder through DiffusersLoader's ``load_diffusers`` and a ControlNet through ``load_controlnet``, whose loaded
weights must equal the file's. Outside ComfyUI (and for the toys, which
ComfyUI has no model for) the pack's own reader reads the file back, the one Apply LoRA, Apply Embedding and the
loaders use, and every tensor must equal what was meant to be written.

A file with keys the reader would ignore stays where it was written (nothing is lost) and the node fails, naming
every such key, so it is found before it is shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import host

BY_COMFYUI = "ComfyUI"
BY_PACK = "the pack's reader"


@dataclass(frozen=True)
class Checked:
    """What a load check found: who read the file, how many of its keys (or vectors) it applied."""

    by: str
    applied: int
    total: int
    unit: str = "keys"
    why: str = ""  #: why the pack's reader checked it inside ComfyUI (the toys)

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return f"checked by {self.by}: {self.applied} of {self.total} {self.unit} applied{why}"


class NotApplied(ValueError):
    """A written file whose reader would ignore some of its keys: the message names every one."""


def verdict(path: Path, by: str, total: int, ignored: list[str], unit: str, hint: str, why: str = "") -> Checked:
    """The check's result, or :class:`NotApplied` naming each ignored key (the file stays where it was written)."""
    if ignored:
        raise NotApplied(f"{path.name} was written, but {by} would ignore {len(ignored)} of its {total} {unit}: "
                         f"{', '.join(sorted(ignored))}. {hint} The file is kept at {path} for inspection; don't "
                         "share it as it is.")
    checked = Checked(by, total, total, unit, why)
    host.log.info("%s: %s", path.name, checked)
    return checked


# -------------------------------------------------------------------------------------------- the families --
def comfy_family(fam) -> tuple[bool, str]:
    """(ComfyUI reads this family's files, why not)."""
    if not host.in_comfyui():
        return False, ""
    if fam is None:
        return False, "the family it was made for is not recorded in it"
    if not fam.config:
        return False, f"ComfyUI has no model of the {fam.label}"
    if not fam.text_encoder_files:
        return False, f"the pack's read-back through ComfyUI does not cover the {fam.label} yet"
    return True, ""


_SKELETONS: dict[str, tuple] = {}


def comfy_skeleton(fam):
    """(model config, weightless BaseModel, weightless text-encoder model, clip target) of ComfyUI for ``fam``,
    built on the meta device from the family's shipped configs, as ComfyUI detects them; kept per family."""
    if fam.name not in _SKELETONS:
        import comfy.model_detection
        import torch

        from ..trainers.model.checkpoint import skeleton_state

        sd = skeleton_state(fam)
        config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
        with torch.device("meta"):
            model = config.get_model(sd, "model.")
            target = config.clip_target(sd)
            clip = target.clip(**target.params)
        _SKELETONS[fam.name] = (config, model, clip, target)
    return _SKELETONS[fam.name]


# ------------------------------------------------------------------------------------------------- LoRA --
class _Reads(dict):
    """A state dict that remembers which keys were read (ComfyUI's LoRA loader reads the keys it uses)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default


def comfy_lora_ignored(path: Path, fam) -> tuple[int, list[str]]:
    """(keys in the file, those ComfyUI's LoraLoader would not apply to a model of ``fam``)."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils

    from ..trainers.methods.lora import split_key

    _, model, clip, _ = comfy_skeleton(fam)
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    weights = set(model.state_dict()) | set(clip.state_dict())
    state = _Reads(comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path), safe_load=True)))
    patches = comfy.lora.load_lora(state, key_map, log_missing=False)
    landed = {m for m, target in key_map.items()
              if target in patches and (target if isinstance(target, str) else target[0]) in weights}
    ignored = [k for k in state if k not in state.read or split_key(k)[0] not in landed]
    return len(state), ignored


def check_lora(path: Path, lora) -> Checked:
    """Save LoRA's file read back: by ComfyUI's LoRA loading for a model of the family it was trained on, else by
    the pack's reader."""
    from ..trainers.families.registry import family_of_lora

    fam = family_of_lora(lora)
    comfy, why = comfy_family(fam)
    if comfy:
        total, ignored = comfy_lora_ignored(path, fam)
        return verdict(path, BY_COMFYUI, total, ignored, "keys",
                       f"ComfyUI's LoraLoader matches none of them to a weight of its {fam.label} model (a LoRA "
                       "keeps kohya's lora_unet_* / lora_te*_ names of the layers it changes).")
    state = _read(path, "lora")
    return verdict(path, BY_PACK, len(lora.state), _unequal(lora.state, state), "keys",
                   "Reading it back gave other tensors than were saved.", why)


def _read(path: Path, what: str) -> dict:
    from ..trainers.runs import reading

    return reading.read(path, what)[0]


def _same(got, want) -> bool:
    """Equal values, compared in the coarser of the two dtypes (a loader may keep fp16 weights in fp32 or bf16: both
    sides rounded alike are then equal)."""
    import torch

    if got.shape != want.shape:
        return False
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.dtype == want.dtype or not (got.is_floating_point() and want.is_floating_point()):
        return got.to(want.dtype).equal(want)
    coarse = max(got.dtype, want.dtype, key=lambda d: torch.finfo(d).eps)
    return got.to(coarse).equal(want.to(coarse))


def _unequal(want: dict, got: dict) -> list[str]:
    """Keys of ``want`` that ``got`` lacks or holds with other values."""
    return [k for k, v in want.items() if k not in got or not _same(got[k], v)]


# -------------------------------------------------------------------------------------------- embedding --
def comfy_embedding_vectors(path: Path, root: Path, fam) -> dict[int, list]:
    """The vectors ComfyUI's tokenizer for ``fam`` puts in a prompt for ``embedding:<name>`` (its load_embed),
    by width (SDXL: clip_l's 768 and clip_g's 1280)."""
    import torch

    _, _, _, target = comfy_skeleton(fam)
    tokenizer = target.tokenizer(embedding_directory=[str(root)], tokenizer_data={})
    name = path.relative_to(root).with_suffix("").as_posix()
    found: dict[int, list] = {}
    for batches in tokenizer.tokenize_with_weights(f"embedding:{name}").values():
        for token in (t[0] for batch in batches for t in batch):
            if isinstance(token, torch.Tensor):
                found.setdefault(token.shape[-1], []).append(token)
    return found


def check_embedding(path: Path, root: Path, emb) -> Checked:
    """Save Embedding's file read back: as ComfyUI reads ``embedding:<name>`` in a prompt of the family it fits,
    else by the pack's reader. Each vector must come back as saved."""
    from ..trainers.families.registry import family_of_embedding

    fam = family_of_embedding(emb)
    comfy, why = comfy_family(fam)
    if not comfy:
        return verdict(path, BY_PACK, len(emb.tensors()), _unequal(emb.tensors(), _read(path, "embedding")),
                       "tensors", "Reading it back gave other vectors than were saved.", why)
    found = comfy_embedding_vectors(path, root, fam)
    want = {name: t for name, t in emb.tensors().items()}
    ignored = []
    for name, vectors in want.items():
        got = found.get(vectors.shape[-1], [])
        ignored += [f"{name}[{i}]" for i, v in enumerate(vectors) if i >= len(got) or not _same(got[i], v)]
    total = sum(len(v) for v in want.values())
    return verdict(path, BY_COMFYUI, total, ignored, "vectors",
                   f"ComfyUI's tokenizer for the {fam.label} did not put them in the prompt for "
                   f"embedding:{path.relative_to(root).with_suffix('').as_posix()} (its log says why).")


# ------------------------------------------------------------------------------------------- checkpoint --
#: marker tensors: ComfyUI reads them as the model's sampling, not as weights
MARKERS = ("v_pred", "ztsnr")


def comfy_checkpoint_ignored(path: Path, tensors: dict) -> list[str]:
    """The keys of a single-file checkpoint ComfyUI's Load Checkpoint does not load as they are in the file."""
    import comfy.sd

    from .bridges import comfy_checkpoint

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    loaded = comfy_checkpoint(model, clip, vae)
    settings = model.model.model_config.sampling_settings
    marks = {"v_pred": "v_pred" in loaded, "ztsnr": bool(settings.get("zsnr"))}
    ignored = [k for k in tensors if k not in MARKERS and (k not in loaded or not _same(loaded[k], tensors[k]))]
    return ignored + [k for k in tensors if k in MARKERS and not marks[k]]


def check_checkpoint(path: Path, tensors: dict, fam) -> Checked:
    """Save Checkpoint's single file read back: by ComfyUI's Load Checkpoint, else by the pack's reader (which
    also recognises the family from it)."""
    comfy, why = comfy_family(fam)
    if comfy:
        return verdict(path, BY_COMFYUI, len(tensors), comfy_checkpoint_ignored(path, tensors), "keys",
                       f"ComfyUI's Load Checkpoint recognised the file but did not load these weights of its "
                       f"{fam.label} model.")
    return verdict(path, BY_PACK, len(tensors), _pack_checkpoint_ignored(path, tensors, fam), "keys",
                   "Reading it back gave other tensors than were saved.", why)


def _pack_checkpoint_ignored(path: Path, tensors: dict, fam) -> list[str]:
    """The keys the pack's reader does not read back as saved, a tensor at a time (a checkpoint is never held
    twice); and the whole file when it reads as another family."""
    from ..trainers.families.registry import family_for_checkpoint
    from ..trainers.runs import reading

    with reading.opened(path, "checkpoint") as f:
        keys = set(f.keys())
        ignored = [k for k, v in tensors.items() if k not in keys or not _same(f.get_tensor(k), v)]
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    found = family_for_checkpoint(shapes)
    if found is not fam:
        ignored.append(f"(the whole file: it reads as the {found.label}, not the {fam.label})")
    return ignored


def check_denoiser_file(path: Path, tensors: dict, fam) -> Checked:
    """A transformer family's diffusion-model file read back by the pack's reader, every tensor as saved."""
    from ..trainers.runs import reading

    with reading.opened(path, "diffusion model") as f:
        keys = set(f.keys())
        ignored = [k for k, v in tensors.items() if k not in keys or not _same(f.get_tensor(k), v)]
    return verdict(path, BY_PACK, len(tensors), ignored, "keys", "Reading it back gave other tensors than were saved.",
                   f"the pack's read-back through ComfyUI does not cover the {fam.label} yet")


# ----------------------------------------------------------------------------------------- diffusers folder --
def comfy_folder_ignored(path: Path, tensors: dict) -> list[str]:
    """The keys of ``tensors`` (the model's single-file state) that ComfyUI's DiffusersLoader does not load from the
    diffusers folder as they are (its ``load_diffusers``: one file per part, no shards); the whole folder when it
    cannot load it at all."""
    import comfy.diffusers_load

    from .bridges import comfy_checkpoint

    try:
        model, clip, vae = comfy.diffusers_load.load_diffusers(str(path), output_vae=True, output_clip=True)
        loaded = comfy_checkpoint(model, clip, vae)
    except Exception as e:  # noqa: BLE001 - what DiffusersLoader would raise is the finding
        return [f"(the whole folder: ComfyUI's DiffusersLoader fails on it: {type(e).__name__}: {e})"]
    return [k for k in tensors if k not in MARKERS and (k not in loaded or not _same(loaded[k], tensors[k]))]


def _pack_folder_ignored(path: Path, model, dtype) -> tuple[int, list[str]]:
    """(tensors written, those the folder's files do not hold as the model's parts have them), a part's files
    read a tensor at a time (transformers' text encoders may spell their keys with or without ``text_model.``)."""
    from ..trainers.model.deltas import plain_state_dict
    from ..trainers.runs import reading

    total, ignored = 0, []
    for name, part in model.parts().items():
        want = {k.removeprefix("text_model."): v for k, v in plain_state_dict(part).items()}
        total += len(want)
        seen = set()
        for file in sorted((path / name).glob("*.safetensors")):
            with reading.opened(file, f"{name} weights") as f:
                for k in f.keys():
                    v = want.get(k.removeprefix("text_model."))
                    if v is None:
                        continue
                    seen.add(k.removeprefix("text_model."))
                    if not _same(f.get_tensor(k), v.to(dtype) if v.is_floating_point() else v):
                        ignored.append(f"{name}/{k}")
        ignored += [f"{name}/{k}" for k in want if k not in seen]
    return total, ignored


def check_folder(path: Path, model, dtype) -> Checked:
    """Save Checkpoint's diffusers folder read back: by ComfyUI's DiffusersLoader for the families it has (every
    loaded weight equal to the model's single-file state in ``dtype``), else by the pack's reader (each part's files,
    every tensor as the model holds it)."""
    from ..trainers.model.checkpoint import to_single_file

    comfy, why = comfy_family(model.family)
    if comfy:
        tensors = to_single_file(model, dtype)
        return verdict(path, BY_COMFYUI, len(tensors), comfy_folder_ignored(path, tensors), "keys",
                       f"ComfyUI's DiffusersLoader did not load these weights of its {model.family.label} model.")
    total, ignored = _pack_folder_ignored(path, model, dtype)
    return verdict(path, BY_PACK, total, ignored, "tensors", "Reading it back gave other tensors than were saved.",
                   why)


# ------------------------------------------------------------------------------------------- ControlNet --
def comfy_controlnet_ignored(path: Path, original: dict) -> list[str]:
    """The weights of a ControlNet (``original``: its original-layout tensors) ComfyUI's ControlNetLoader does not
    load as they are, whichever layout the file has."""
    import comfy.controlnet

    from ..trainers.adapters.controlnet.files import ORIGINAL_PREFIX

    net = comfy.controlnet.load_controlnet(str(path))
    if net is None or getattr(net, "control_model", None) is None:
        return ["(the whole file: ComfyUI found no ControlNet in it)"]
    loaded = net.control_model.state_dict()
    return [k for k, v in original.items()
            if k.removeprefix(ORIGINAL_PREFIX) not in loaded or not _same(loaded[k.removeprefix(ORIGINAL_PREFIX)], v)]


def check_controlnet(path: Path, cn, layout: str, dtype: str) -> Checked:
    """Save ControlNet's file read back: by ComfyUI's ControlNetLoader, else by the pack's reader."""
    from ..trainers.adapters.controlnet.files import family_of as cn_family
    from ..trainers.adapters.controlnet.files import file_contents

    comfy, why = comfy_family(cn_family(cn.net.config))
    if comfy:  # ComfyUI loads either layout as the original one
        original = file_contents(cn, "original", dtype)[0]
        return verdict(path, BY_COMFYUI, len(original), comfy_controlnet_ignored(path, original), "weights",
                       "ComfyUI's ControlNetLoader did not load these weights as saved.")
    tensors = file_contents(cn, layout, dtype)[0]
    return verdict(path, BY_PACK, len(tensors), _unequal(tensors, _read(path, "ControlNet")), "keys",
                   "Reading it back gave other tensors than were saved.", why)
