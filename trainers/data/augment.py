"""On-the-fly augmentation of training batches with kornia (flip, resized crop, colour jitter), drawn from the
run's generator so a resumed run augments exactly as an uninterrupted one."""
from __future__ import annotations

import torch


def augment_batch(px: torch.Tensor, aug, g: torch.Generator, condition: torch.Tensor | None = None,
                  geometry: dict | None = None):
    """Random flip, resized crop and colour jitter with kornia, drawn from ``g``.

    With a paired ``condition`` (B, 3, H, W in 0..1) the flip and crop move picture and condition together, the
    colour jitter touches only the picture, and the pair is returned. A ``geometry`` dict receives what was done to
    each picture (SDXL's time ids follow it): "flipped" (B,) bool, then "box" (B, 4): top, left, height and width
    of the region that was cropped from the (flipped) picture and resized back to its size.
    """
    if geometry is not None:
        n, (h, w) = len(px), px.shape[-2:]
        geometry["flipped"] = torch.zeros(n, dtype=torch.bool)
        geometry["box"] = torch.tensor([[0.0, 0.0, h, w]]).repeat(n, 1)
    if aug is None:
        return px if condition is None else (px, condition)
    import kornia.augmentation as K

    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
    geo = []
    if aug.flip:
        geo.append(K.RandomHorizontalFlip(p=aug.flip))
    if aug.crop_scale < 1:
        geo.append(K.RandomResizedCrop(px.shape[-2:], scale=(aug.crop_scale, 1.0)))
    if not geo and not aug.color_jitter:
        return px if condition is None else (px, condition)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # kornia draws from the global RNG: seed it from ours, then put it back
    try:
        x = (px + 1) / 2
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        if geo:
            seq = K.AugmentationSequential(*geo)
            x = seq(x)
            if geometry is not None:
                _record(seq, geometry)
        img, cond = x[:, :3], x[:, 3:]
        if aug.color_jitter:
            j = aug.color_jitter
            img = K.ColorJitter(j, j, j, j / 4, p=1.0)(img)
    finally:
        torch.random.set_rng_state(state)
    img = img.clamp(0, 1) * 2 - 1
    return img if condition is None else (img, cond.clamp(0, 1))


def _record(seq, geometry: dict) -> None:
    """Read kornia's drawn parameters: the flip's per-picture choice, the crop's source corners."""
    for item in seq._params:
        if item.name.startswith("RandomHorizontalFlip"):
            geometry["flipped"] = item.data["batch_prob"].bool().cpu()
        elif item.name.startswith("RandomResizedCrop"):
            src = item.data["src"].float().cpu()  # (B, 4 corners, x y): top-left, top-right, bottom-right, ...
            top, left = src[:, 0, 1], src[:, 0, 0]
            geometry["box"] = torch.stack([top, left, src[:, 2, 1] - top + 1, src[:, 2, 0] - left + 1], dim=1)
