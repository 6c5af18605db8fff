"""ControlNet: the value that flows on the canvas (``FT_CONTROLNET``) and a new one made from a base UNet.

Files live in :mod:`.files`, applying one while sampling in :mod:`.apply`, training in
:mod:`...methods.controlnet`.

A ControlNet is a trainable copy of the UNet's encoder that reads a condition image (edges, a scribble...) through a
small convolutional embedding and adds its features to the frozen UNet's skip connections through zero-initialised
1x1 convolutions (Zhang et al. 2023), so at step 0 it changes nothing. diffusers' ``ControlNetModel`` is the module.

"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ...families.registry import FAMILIES, Family
from ...model.model import FTModel

log = logging.getLogger(__name__)


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
        model_desc = f"{model.family.label} (cross-attention width {u.cross_attention_dim})"
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

    from ...model.deltas import has_deltas, materialize

    # live LoRAs merged: from a copy only then (from_unet copies each weight into the fp32 ControlNet, so a half-
    # precision UNet needs no fp32 copy of its own: 10 GB for SDXL's)
    unet = materialize(model.unet) if has_deltas(model.unet) else model.unet
    with torch.inference_mode(False):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(model))
    return ControlNet(net.to(model.device).eval(), name, source=f"from the UNet of {model.name}")
