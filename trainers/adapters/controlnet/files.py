"""ControlNet files: the original single-file layout (``control_model.*``) and the diffusers layout, read strictly
and written atomically. The key mapping between the two is a published fact of the layouts: ``input_hint_block``
<-> ``controlnet_cond_embedding``, ``zero_convs.N.0`` <-> ``controlnet_down_blocks.N``, ``middle_block_out.0`` <->
``controlnet_mid_block``, the rest as in the UNet's encoder (see checkpoint.unet_key).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...families.ldm import unet_key
from .value import ControlNet, describe_architecture, family_of
from ...families.registry import FAMILIES

log = logging.getLogger(__name__)
ORIGINAL_PREFIX = "control_model."
#: safetensors metadata key holding the diffusers config of a ControlNet the pack wrote (any architecture)
CONFIG_KEY = "finetune_controlnet_config"


def _hint_key(k: str, n_blocks: int) -> str:
    p = k.split(".")
    if p[1] == "conv_in":
        return f"input_hint_block.0.{p[2]}"
    if p[1] == "blocks":
        return f"input_hint_block.{2 * (int(p[2]) + 1)}.{p[3]}"
    if p[1] == "conv_out":
        return f"input_hint_block.{2 * (n_blocks + 1)}.{p[2]}"
    raise KeyError(k)


def original_key(k: str, config) -> str:
    """diffusers ControlNetModel key -> original-layout key (without the ``control_model.`` prefix)."""
    p = k.split(".")
    if p[0] == "controlnet_cond_embedding":
        return _hint_key(k, 2 * (len(config.conditioning_embedding_out_channels) - 1))
    if p[0] == "controlnet_down_blocks":
        return f"zero_convs.{p[1]}.0.{p[2]}"
    if p[0] == "controlnet_mid_block":
        return f"middle_block_out.0.{p[1]}"
    return unet_key(k, config.layers_per_block, [])


def to_original(net) -> dict[str, torch.Tensor]:
    return {ORIGINAL_PREFIX + original_key(k, net.config): v for k, v in net.state_dict().items()}


def detect_layout(keys) -> str:
    keys = set(keys)
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    if ORIGINAL_PREFIX + "input_hint_block.0.weight" in keys or "input_hint_block.0.weight" in keys:
        return "original"
    if any(k.startswith("lllite") or "lllite" in k for k in keys):
        raise ValueError("this is a ControlNet-LLLite file (kohya's SDXL adapter), which the pack does not load")
    raise ValueError("not a ControlNet: it has neither diffusers keys (controlnet_cond_embedding.*) nor original "
                     "ones (control_model.input_hint_block.*)")


def context_width(state_keys_shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Cross-attention width, read from the first attn2.to_k weight in either layout."""
    for k, shape in state_keys_shapes.items():
        if k.endswith("attn2.to_k.weight"):
            return int(shape[1])
    return None


def config_for_file(keys_shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], name: str) -> dict:
    """The diffusers config of a ControlNet file: its own (files the pack wrote), else a shipped one by family."""
    if metadata.get(CONFIG_KEY):
        return json.loads(metadata[CONFIG_KEY])
    ctx = context_width(keys_shapes)
    fam = family_of({"cross_attention_dim": ctx})
    if fam is None:
        raise ValueError(f"{name}: unrecognised ControlNet (cross-attention width {ctx}); the pack knows "
                         + ", ".join(f"{f.label} ({f.context_dim})" for f in FAMILIES.values()))
    return json.loads(fam.controlnet_config.read_text())


def from_state(state: dict[str, torch.Tensor], config: dict, name: str, source: str = "") -> ControlNet:
    """Build a ControlNetModel from ``config`` and fill it from a state dict in either layout (strict)."""
    from diffusers import ControlNetModel

    layout = detect_layout(state)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.inference_mode(False):
        net = ControlNetModel.from_config(cfg)
    own = net.state_dict()
    prefixed = layout == "original" and any(k.startswith(ORIGINAL_PREFIX) for k in state)
    if layout == "original":
        lookup = {k: (ORIGINAL_PREFIX if prefixed else "") + original_key(k, net.config) for k in own}
    else:
        lookup = {k: k for k in own}
    missing = [k for k, src in lookup.items() if src not in state]
    shape_bad = [k for k, src in lookup.items() if src in state and tuple(state[src].shape) != tuple(own[k].shape)]
    if missing or shape_bad:
        arch = describe_architecture(cfg)
        what = (f"{len(missing)} weights missing (e.g. {lookup[missing[0]]})" if missing else
                f"{len(shape_bad)} weights of another shape (e.g. {lookup[shape_bad[0]]}: "
                f"{tuple(state[lookup[shape_bad[0]]].shape)} vs {tuple(own[shape_bad[0]].shape)})")
        raise ValueError(f"{name} does not match the {arch} ControlNet layout: {what}")
    used = set(lookup.values())
    extra = [k for k in state if k not in used]
    own_prefix = [k for k in extra if layout == "diffusers" or k.startswith(ORIGINAL_PREFIX) or not prefixed]
    if own_prefix:
        raise ValueError(f"{name} has {len(own_prefix)} ControlNet weights a {describe_architecture(cfg)} ControlNet "
                         f"does not have (e.g. {own_prefix[0]}): a ControlNet of another kind?")
    if extra:  # e.g. a file that also carries the base model: not ours to load
        log.warning("%s: ignored %d weights outside control_model.*", name, len(extra))
    net.load_state_dict({k: state[src].float() for k, src in lookup.items()}, strict=True)
    return ControlNet(net.eval(), name, source=source or layout)


def load_file(path: str | Path) -> ControlNet:
    """A single ``.safetensors`` ControlNet in the original or the diffusers layout (a diffusers folder's weights
    file is read with the folder's config.json)."""
    from ...runs import reading

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors ControlNets are loaded; a {path.suffix} file is a pickle "
                         "that can run code when opened. Convert it to safetensors first")
    shapes, meta = reading.header(path, "ControlNet")
    layout = detect_layout(shapes)
    sibling = path.with_name("config.json")
    if layout == "diffusers" and not meta.get(CONFIG_KEY) and sibling.is_file():
        config = json.loads(sibling.read_text())  # a diffusers folder's weights file: use the folder's config
    else:
        config = config_for_file(shapes, meta, path.name)
    cn = from_state(reading.read(path, "ControlNet")[0], config, path.stem, source=path.name)
    cn.meta = {k: v for k, v in meta.items() if k != CONFIG_KEY}
    return cn


def load_folder(folder: str | Path) -> ControlNet:
    """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)."""
    from ...runs import reading

    folder = Path(folder)
    cfg_file = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors"))
    if not cfg_file.is_file() or not weights:
        has_bin = bool(list(folder.glob("*.bin")))
        raise FileNotFoundError(f"{folder.name} is not a diffusers ControlNet folder: it needs config.json and a "
                                ".safetensors file" + (" (it has only a pickled .bin, which the pack refuses to "
                                                        "load because it can run code)" if has_bin else ""))
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        state.update(reading.read(w, f"ControlNet {folder.name}:")[0])
    return from_state(state, json.loads(cfg_file.read_text()), folder.name, source=folder.name)


def save(cn: ControlNet, folder: Path, stem: str, layout: str = "original", dtype: str = "fp16",
         metadata: dict | None = None) -> Path:
    """Write ``folder/stem.safetensors`` (never over an existing file) in ``layout``; returns the path."""
    from ...runs.export import save_unique

    return save_unique(folder, stem, *file_contents(cn, layout, dtype, metadata))


def file_contents(cn: ControlNet, layout: str = "original", dtype: str = "fp16",
                  metadata: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a ControlNet file in ``layout`` and ``dtype``."""
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout {layout!r} is not known; choose original or diffusers")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    state = to_original(cn.net) if layout == "original" else dict(cn.net.state_dict())
    state = {k: v.detach().to("cpu", dt) for k, v in state.items()}
    cfg = {k: v for k, v in dict(cn.net.config).items() if not k.startswith("_")}
    meta = {CONFIG_KEY: json.dumps(cfg, default=_json_default), "finetune_layout": layout,
            "modelspec.architecture": f"{_version(cn)}/controlnet", **{k: str(v) for k, v in (metadata or {}).items()}}
    return state, meta


def _json_default(o):
    return list(o) if isinstance(o, tuple) else str(o)


def _version(cn: ControlNet) -> str:
    fam = family_of(cn.net.config)
    return fam.base_model_version if fam else "unknown"
