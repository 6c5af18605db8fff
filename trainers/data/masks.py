"""Masked loss: a picture may come with a mask (its alpha channel, ``name.mask.png`` beside it, or a ComfyUI
``MASK`` in Dataset From Images), and the loss of its pixels is weighted by the mask at the latents' resolution:
``unmasked_weight + (1 - unmasked_weight) * mask``. With ``unmasked_weight`` 0 only the masked part trains (a
subject without its background), with 1 the mask is ignored. Bucketing, crops and flips move a mask with its
picture; a picture without a mask in a masked dataset counts everywhere.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F


def attach(dataset, masks: np.ndarray):
    """``dataset`` with ComfyUI ``MASK`` values (B, H, W) or (H, W) in 0..1 (white = trains) as its pictures' masks:
    one per picture, or one for all."""
    m = np.asarray(masks, dtype=np.float32)
    if m.ndim == 2:
        m = m[None]
    n = len(dataset.examples)
    if m.ndim != 3 or m.shape[0] not in (1, n):
        raise ValueError(f"masks: {m.shape[0] if m.ndim == 3 else '?'} masks for {n} pictures; give one mask, or one "
                         "per picture (a MASK batch)")
    out = []
    for i, e in enumerate(dataset.examples):
        mi = m[0 if m.shape[0] == 1 else i]
        if mi.shape != e.image.shape[:2]:
            raise ValueError(f"masks: mask {i} is {mi.shape[1]}x{mi.shape[0]}, its picture {e.image.shape[1]}x"
                             f"{e.image.shape[0]}; a mask must have its picture's size")
        out.append(replace(e, mask=(np.clip(mi, 0, 1) * 255).round().astype(np.uint8)))
    return replace(dataset, examples=out)


def latent_weights(mask: torch.Tensor, latent_hw: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """(B, 1, H, W) masks in 0..1 at the pictures' size -> (B, 1, h, w) loss weights at the latents' size (the mean
    of each latent's pixels)."""
    m = F.adaptive_avg_pool2d(mask.float(), latent_hw)
    return unmasked_weight + (1.0 - unmasked_weight) * m


def weighted_mean(per_pixel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: the weighted mean of ``per_pixel`` (B, C, h, w) over its pixels; a sample whose weights are
    all 0 gives 0 (it does not train)."""
    w = weights.to(per_pixel.dtype).expand_as(per_pixel)
    dims = tuple(range(1, per_pixel.ndim))
    return (per_pixel * w).sum(dims) / w.sum(dims).clamp_min(1e-8)
