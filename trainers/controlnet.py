"""ControlNet: make one from a base UNet, train it with the shared loop, load and save files, apply it in sampling.

A ControlNet is a trainable copy of the UNet's encoder that reads a condition image (edges, a scribble...) through a
small convolutional embedding and adds its features to the frozen UNet's skip connections through zero-initialised
1x1 convolutions (Zhang et al. 2023), so at step 0 it changes nothing. diffusers' ``ControlNetModel`` is the module.

Files: the original single-file layout (``control_model.*``: ComfyUI's ControlNetLoader, A1111's sd-webui-controlnet,
diffusers' ``from_single_file``) and the diffusers layout (a ``diffusion_pytorch_model.safetensors`` with diffusers
key names, or a folder with its ``config.json``). The key mapping between the two is a published fact of the
layouts: ``input_hint_block`` <-> ``controlnet_cond_embedding``, ``zero_convs.N.0`` <-> ``controlnet_down_blocks.N``,
``middle_block_out.0`` <-> ``controlnet_mid_block``, the rest as in the UNet's encoder (see checkpoint.unet_key).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import unet_key
from .families import FAMILIES, Family
from .loop import Method
from .model import FTModel

log = logging.getLogger(__name__)
ORIGINAL_PREFIX = "control_model."
RESIZE_MODES = ("crop", "fit", "stretch")
#: safetensors metadata key holding the diffusers config of a ControlNet the pack wrote (any architecture)
CONFIG_KEY = "finetune_controlnet_config"


# ------------------------------------------------------------------------------------------------ the value --
@dataclass(eq=False)
class ControlNet:
    """``FT_CONTROLNET``: a diffusers ControlNetModel plus where it came from. Nodes never change one in place."""

    net: torch.nn.Module
    name: str
    source: str = ""
    meta: dict = field(default_factory=dict)

    def architecture(self) -> str:
        return describe_architecture(self.net.config)

    def __repr__(self) -> str:
        return f"ControlNet({self.name!r}, {self.architecture()})"


def family_of(config) -> Family | None:
    ctx = config.get("cross_attention_dim") if isinstance(config, dict) else config.cross_attention_dim
    return next((f for f in FAMILIES.values() if f.context_dim == ctx), None)


def describe_architecture(config) -> str:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    ctx = get("cross_attention_dim")
    fam = family_of(config)
    if fam is not None:
        return f"{fam.label} (cross-attention width {ctx})"
    if ctx == 2048:
        return "SDXL (cross-attention width 2048)"
    return f"an unknown architecture (cross-attention width {ctx})"


def hint_factor(config) -> int:
    """How much the condition embedding shrinks the image: it must equal the VAE's factor."""
    chans = config.get("conditioning_embedding_out_channels") if isinstance(config, dict) else \
        config.conditioning_embedding_out_channels
    return 2 ** (len(chans) - 1)


def check_compatible(cn: ControlNet, model: FTModel, what: str = "control_net") -> None:
    """A ControlNet must have the UNet's encoder shape and the VAE's downsampling; else name both."""
    c, u = cn.net.config, model.unet.config
    keys = ("cross_attention_dim", "block_out_channels", "layers_per_block", "in_channels", "down_block_types")
    diff = [k for k in keys if _norm(getattr(c, k, None)) != _norm(getattr(u, k, None))]
    if diff or hint_factor(c) != model.vae_scale_factor:
        fam = FAMILIES.get(model.family)
        model_desc = f"{fam.label if fam else model.family} (cross-attention width {u.cross_attention_dim})"
        detail = "; ".join(f"{k} {_norm(getattr(c, k, None))} vs {_norm(getattr(u, k, None))}" for k in diff) or \
            f"condition downsampling x{hint_factor(c)} vs the VAE's x{model.vae_scale_factor}"
        raise ValueError(f"{what} {cn.name!r} is a ControlNet for {cn.architecture()}, but the model {model.name!r} "
                         f"is {model_desc} ({detail}): load a ControlNet made for this model's family")


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ------------------------------------------------------------------------------------------------- creation --
def conditioning_channels_for(model: FTModel) -> tuple[int, ...]:
    """The condition embedding's widths: SD's (16, 32, 96, 256) for an 8x VAE, fewer stages for a smaller one."""
    stages = int(math.log2(model.vae_scale_factor)) + 1
    return (16, 32, 96, 256)[:stages] if stages <= 4 else tuple(16 * 2 ** i for i in range(stages))


def new_controlnet(model: FTModel, name: str = "controlnet") -> ControlNet:
    """A ControlNet initialised from ``model``'s UNet encoder; its output convolutions are zero (a no-op start)."""
    from diffusers import ControlNetModel

    unet = model.unet if model.dtype == torch.float32 else copy.deepcopy(model.unet).float()  # fp32 weights
    with torch.inference_mode(False):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(model))
    return ControlNet(net.to(model.device).eval(), name, source=f"from the UNet of {model.name}")


# ------------------------------------------------------------------------------------------------ key layouts --
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
    if ctx == 2048:
        raise ValueError(f"{name} is an SDXL ControlNet (cross-attention width 2048); the pack's models are SD 1.x, "
                         "SD 2.x and the toy, so it cannot drive them. Use an SD 1.5 ControlNet")
    fam = family_of({"cross_attention_dim": ctx})
    if fam is None:
        raise ValueError(f"{name}: unrecognised ControlNet (cross-attention width {ctx}); the pack knows "
                         + ", ".join(f"{f.label} ({f.context_dim})" for f in FAMILIES.values()))
    if fam.config_dir is None:  # the toy: the shipped toy ControlNet's config
        from .toy.loader import WEIGHTS

        cfg_file = WEIGHTS / "controlnet" / "config.json"
    else:
        cfg_file = fam.config_dir / "controlnet" / "config.json"
    return json.loads(cfg_file.read_text())


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
    from safetensors import safe_open
    from safetensors.torch import load_file as st_load

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors ControlNets are loaded; a {path.suffix} file is a pickle "
                         "that can run code when opened. Convert it to safetensors first")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    layout = detect_layout(shapes)
    sibling = path.with_name("config.json")
    if layout == "diffusers" and not meta.get(CONFIG_KEY) and sibling.is_file():
        config = json.loads(sibling.read_text())  # a diffusers folder's weights file: use the folder's config
    else:
        config = config_for_file(shapes, meta, path.name)
    cn = from_state(st_load(str(path)), config, path.stem, source=path.name)
    cn.meta = {k: v for k, v in meta.items() if k != CONFIG_KEY}
    return cn


def load_folder(folder: str | Path) -> ControlNet:
    """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.torch import load_file as st_load

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
        state.update(st_load(str(w)))
    return from_state(state, json.loads(cfg_file.read_text()), folder.name, source=folder.name)


def save(cn: ControlNet, folder: Path, stem: str, layout: str = "original", dtype: str = "fp16",
         metadata: dict | None = None) -> Path:
    """Write ``folder/stem.safetensors`` (never over an existing file) in ``layout``; returns the path."""
    from .export import save_unique

    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout {layout!r} is not known; choose original or diffusers")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    state = to_original(cn.net) if layout == "original" else dict(cn.net.state_dict())
    state = {k: v.detach().to("cpu", dt) for k, v in state.items()}
    cfg = {k: v for k, v in dict(cn.net.config).items() if not k.startswith("_")}
    meta = {CONFIG_KEY: json.dumps(cfg, default=_json_default), "finetune_layout": layout,
            "modelspec.architecture": f"{_version(cn)}/controlnet", **{k: str(v) for k, v in (metadata or {}).items()}}
    return save_unique(folder, stem, state, meta)


def _json_default(o):
    return list(o) if isinstance(o, tuple) else str(o)


def _version(cn: ControlNet) -> str:
    from .export import BASE_MODEL_VERSION

    fam = family_of(cn.net.config)
    return BASE_MODEL_VERSION.get(fam.name, fam.name) if fam else "unknown"


# --------------------------------------------------------------------------------------------------- applying --
@dataclass(eq=False)
class Control:
    """One application: a ControlNet, its condition images (B, H, W, 3) in 0..1, strength and active range."""

    control_net: ControlNet
    image: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        if not 0 <= self.start_percent <= self.end_percent <= 1:
            raise ValueError(f"start_percent {self.start_percent} must not exceed end_percent {self.end_percent} "
                             "(both between 0 and 1)")

    def active(self, i: int, total: int) -> bool:
        """Whether step ``i`` of ``total`` lies inside [start, end] (diffusers' control_guidance_start/end rule)."""
        return self.strength != 0 and not (i / total < self.start_percent or (i + 1) / total > self.end_percent)


def fit_condition(image: torch.Tensor, height: int, width: int, mode: str = "crop") -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, height, width) in 0..1: crop = cover then centre-crop, fit = letterbox on black,
    stretch = ignore the aspect ratio."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {mode!r} is not known; choose one of: {', '.join(RESIZE_MODES)}")
    x = image[..., :3].float().permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x.contiguous()

    def resize(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)

    if mode == "stretch":
        return resize(x, (height, width))
    s = max(height / h, width / w) if mode == "crop" else min(height / h, width / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if mode == "crop":
        nh, nw = max(nh, height), max(nw, width)
        y = resize(x, (nh, nw))
        top, left = (nh - height) // 2, (nw - width) // 2
        return y[..., top:top + height, left:left + width].contiguous()
    nh, nw = min(nh, height), min(nw, width)
    y = resize(x, (nh, nw))
    out = torch.zeros(x.shape[0], 3, height, width, dtype=y.dtype, device=y.device)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[..., top:top + nh, left:left + nw] = y
    return out


@dataclass(eq=False)
class PreparedControl:
    control: Control
    cond: torch.Tensor  # (B or 2B, 3, H, W) on the model's device and dtype
    net: torch.nn.Module  # the ControlNet on the model's device and dtype


def prepare_controls(controls, model: FTModel, n: int, height: int, width: int, resize_mode: str,
                     cfg_batch: bool) -> list[PreparedControl]:
    """Check each ControlNet against ``model`` and turn its image into the sampler's condition batch."""
    out, moved = [], {}
    for k, c in enumerate(controls or ()):
        check_compatible(c.control_net, model, what=f"control {k + 1}")
        if c.strength == 0:
            continue  # exactly the image without control
        img = fit_condition(c.image, height, width, resize_mode)
        if img.shape[0] not in (1, n):
            raise ValueError(f"control {k + 1} ({c.control_net.name}) has {img.shape[0]} condition images for "
                             f"{n} generated images: give one image, or one per image")
        img = img.expand(n, -1, -1, -1) if img.shape[0] == 1 else img
        if cfg_batch:
            img = torch.cat([img, img])
        net = c.control_net.net
        p = next(net.parameters())
        if p.device != model.device or p.dtype != model.dtype:
            # a copy for this call: the ControlNet value (cached by ComfyUI, or being trained) is never changed
            key = id(net)
            if key not in moved:
                moved[key] = copy.deepcopy(net).to(model.device, model.dtype)
            net = moved[key]
        out.append(PreparedControl(c, img.to(model.device, model.dtype), net))
    return out


def residuals(prepared: list[PreparedControl], x, t, context, i: int, total: int):
    """Summed ControlNet residuals at step ``i`` (None, None when no control is active)."""
    down, mid = None, None
    for p in prepared:
        if not p.control.active(i, total):
            continue
        d, m = p.net(x, t, encoder_hidden_states=context, controlnet_cond=p.cond,
                     conditioning_scale=float(p.control.strength), return_dict=False)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return down, mid


# --------------------------------------------------------------------------------------------------- training --
class ControlNetMethod(Method):
    """Train a ControlNet (all its weights) against the frozen model; the condition comes from a preprocessor
    applied to each training picture on the fly, or from a paired conditions dataset."""

    name = "controlnet"

    def __init__(self, preprocessor: str | None = "canny", preprocessor_options: dict | None = None,
                 init: ControlNet | None = None, name: str = "controlnet"):
        from .preprocess import PREPROCESSORS

        self.preprocessor = preprocessor
        self.options = dict(preprocessor_options or {})
        if preprocessor is not None:
            if preprocessor not in PREPROCESSORS:
                raise ValueError(f"preprocessor {preprocessor!r} is not known; choose one of: "
                                 f"{', '.join(PREPROCESSORS)}")
            PREPROCESSORS[preprocessor](torch.zeros(1, 8, 8, 3), **self.options)  # bad options fail now, not at step 1
        self.init = init
        self.run_name = name
        self.cn: ControlNet | None = None
        self.validation_condition: torch.Tensor | None = None

    def setup(self, model: FTModel) -> None:
        if self.init is not None:
            check_compatible(self.init, model, what="control_net")
            net = copy.deepcopy(self.init.net).float().to(model.device)
            self.cn = ControlNet(net, self.run_name, source=f"continued from {self.init.name}")
        else:
            self.cn = new_controlnet(model, self.run_name)
        self.cn.net.requires_grad_(True)

    def param_groups(self, cfg):
        return [{"params": [p for p in self.cn.net.parameters() if p.requires_grad], "lr": cfg.learning_rate}]

    def trainable_state(self):
        return dict(self.cn.net.state_dict())

    def load_trainable_state(self, state):
        self.cn.net.load_state_dict(state, strict=True)

    def train_modules(self, model):
        return [self.cn.net]

    def config(self) -> dict:
        return {"method": self.name, "preprocessor": self.preprocessor or "paired conditions",
                "preprocessor_options": self.options,
                "init": self.init.name if self.init is not None else "base UNet encoder"}

    def condition(self, batch: dict) -> torch.Tensor:
        from .preprocess import PREPROCESSORS

        if batch.get("conditions") is not None:
            return batch["conditions"]
        if self.preprocessor is None:
            raise ValueError("the dataset has no paired conditions and no preprocessor was chosen")
        px = (batch["pixels"].float() + 1) / 2
        img = PREPROCESSORS[self.preprocessor](px.permute(0, 2, 3, 1), **self.options)
        return img.permute(0, 3, 1, 2)

    def predict(self, model, noisy, t, context, batch):
        cond = self.condition(batch).to(noisy.device, noisy.dtype)
        if self.validation_condition is None:
            self.validation_condition = cond[:1].detach().float().cpu().permute(0, 2, 3, 1)
        down, mid = self.cn.net(noisy, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        return model.unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample

    def sample_kwargs(self) -> dict:
        if self.validation_condition is None:
            return {}
        return {"controls": [Control(self.cn, self.validation_condition)]}

    def result(self) -> ControlNet:
        """The trained ControlNet as an independent value (eval mode, no gradients)."""
        net = copy.deepcopy(self.cn.net).eval().requires_grad_(False)
        return ControlNet(net, self.cn.name, source=self.cn.source)
