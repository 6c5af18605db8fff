"""ControlNet condition images made with kornia: no learned weights, nothing downloaded, batched, deterministic.

Every function takes and returns a ComfyUI IMAGE tensor (B, H, W, 3), float 0..1, on the input's device.
"""
from __future__ import annotations

import torch


def check_image(image, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        hint = " (that is a MASK: convert it with a Mask To Image node)" if getattr(image, "ndim", 0) == 3 else ""
        raise ValueError(f"{name} must be an IMAGE batch (batch, height, width, 3), got {shape}{hint}")
    if image.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")


def _bchw(image: torch.Tensor) -> torch.Tensor:
    x = image[..., :3].float().permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _image(x: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, H, W) -> IMAGE (B, H, W, 3) in 0..1."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def grayscale(image: torch.Tensor) -> torch.Tensor:
    import kornia

    check_image(image)
    return _image(kornia.color.rgb_to_grayscale(_bchw(image)))


def canny(image: torch.Tensor, low_threshold: float = 0.4, high_threshold: float = 0.8) -> torch.Tensor:
    """Binary Canny edges (white on black), as the canny ControlNet expects."""
    import kornia

    check_image(image)
    if not 0 <= low_threshold <= high_threshold <= 1:
        raise ValueError(f"low_threshold {low_threshold} must not exceed high_threshold {high_threshold} "
                         "(both between 0 and 1)")
    _, edges = kornia.filters.canny(_bchw(image), low_threshold, high_threshold)
    return _image((edges > 0).float())


def soft_edges(image: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude, each picture normalised to 0..1: a soft-edge map."""
    import kornia

    check_image(image)
    mag = kornia.filters.sobel(kornia.color.rgb_to_grayscale(_bchw(image)))
    peak = mag.flatten(1).amax(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return _image(mag / peak)


def scribble(image: torch.Tensor, threshold: float = 0.3, thickness: int = 3) -> torch.Tensor:
    """Thick binary strokes: strong Sobel edges, thresholded, then dilated to ``thickness`` pixels."""
    import kornia

    check_image(image)
    if thickness < 1:
        raise ValueError(f"thickness must be at least 1 pixel, got {thickness}")
    edges = (soft_edges(image)[..., :1].permute(0, 3, 1, 2) > threshold).float()
    if thickness > 1:
        edges = kornia.morphology.dilation(edges, torch.ones(thickness, thickness, device=edges.device))
    return _image(edges)


def tile_blur(image: torch.Tensor, downscale: float = 4.0, blur_sigma: float = 1.0) -> torch.Tensor:
    """Downsample by ``downscale``, blur, and bring back to the input size: a tile-ControlNet condition."""
    import kornia
    import torch.nn.functional as F

    check_image(image)
    if downscale < 1:
        raise ValueError(f"downscale must be at least 1, got {downscale}")
    x = _bchw(image)
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h / downscale)), max(1, round(w / downscale))), mode="area")
    if blur_sigma > 0:
        k = max(3, int(2 * round(3 * blur_sigma) + 1))
        small = kornia.filters.gaussian_blur2d(small, (k, k), (blur_sigma, blur_sigma), border_type="replicate")
    return _image(F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False))


#: name -> preprocessor, for training a ControlNet on conditions made on the fly (the nodes' names, lower case)
PREPROCESSORS = {"canny": canny, "soft_edges": soft_edges, "scribble": scribble, "tile_blur": tile_blur,
                 "grayscale": grayscale}
