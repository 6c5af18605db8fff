"""Applying ControlNets while sampling: a :class:`Control` (a ControlNet, its condition images, strength and active
range), conditions fitted to the picture size, and the summed residuals the UNet adds at each step."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .value import ControlNet, check_compatible
from ...model.model import FTModel

RESIZE_MODES = ("crop", "fit", "stretch")


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


def residuals(prepared: list[PreparedControl], x, t, conditioning: dict, i: int, total: int):
    """Summed ControlNet residuals at step ``i`` (None, None when no control is active); ``conditioning`` is
    :meth:`.model.FTModel.conditioning`'s."""
    down, mid = None, None
    for p in prepared:
        if not p.control.active(i, total):
            continue
        d, m = p.net(x, t, controlnet_cond=p.cond, conditioning_scale=float(p.control.strength), return_dict=False,
                     **conditioning)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return down, mid
