"""ControlNet preprocessors: edges where they belong, ComfyUI's IMAGE convention, determinism, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes.controlnet import FT_CannyEdges, FT_Grayscale, FT_Scribble, FT_SoftEdges, FT_TileBlur

NODES = [(FT_CannyEdges, {"low_threshold": 0.4, "high_threshold": 0.8}), (FT_SoftEdges, {}),
         (FT_Scribble, {"threshold": 0.3, "thickness": 3}), (FT_TileBlur, {"downscale": 4.0, "blur_sigma": 1.0}),
         (FT_Grayscale, {})]


def square(size=64, lo=16, hi=48, color=(1.0, 0.2, 0.1)):
    img = torch.zeros(1, size, size, 3)
    img[0, lo:hi, lo:hi] = torch.tensor(color)
    return img


def numpy_border(mask: np.ndarray) -> np.ndarray:
    """Reference: pixels where the filled shape's inside meets its outside (4-neighbourhood)."""
    m = mask.astype(bool)
    edge = np.zeros_like(m)
    edge[:-1] |= m[:-1] != m[1:]
    edge[1:] |= m[:-1] != m[1:]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    edge[:, 1:] |= m[:, :-1] != m[:, 1:]
    return edge


def near(a: np.ndarray, b: np.ndarray, r: int = 2) -> np.ndarray:
    """For each True pixel of a: is there a True pixel of b within r (Chebyshev)?"""
    pad = np.pad(b, r)
    hit = np.zeros_like(b)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            hit |= pad[r + dy:r + dy + b.shape[0], r + dx:r + dx + b.shape[1]]
    return a & hit


def test_canny_of_a_filled_square_lies_on_its_border():
    img = square()
    edges = FT_CannyEdges().execute(img, 0.4, 0.8)[0][0, ..., 0].numpy() > 0.5
    ref = numpy_border((img[0, ..., 0] > 0.5).numpy())
    precision = near(edges, ref).sum() / max(1, edges.sum())
    recall = near(ref, edges).sum() / ref.sum()
    print(f"canny vs numpy border: precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.9


@pytest.mark.parametrize("node,opts", NODES, ids=[n.__name__ for n, _ in NODES])
def test_image_convention_and_determinism(node, opts):
    img = torch.cat([square(), square(lo=8, hi=40, color=(0.1, 0.4, 0.9))])
    a = node().execute(img, **opts)[0]
    b = node().execute(img, **opts)[0]
    assert a.shape == img.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    assert torch.equal(a[..., 0], a[..., 1]) or node is FT_TileBlur  # edge maps are grey, repeated on 3 channels


def test_each_map_has_its_character():
    img = square()
    soft = FT_SoftEdges().execute(img)[0]
    assert float(soft.max()) == pytest.approx(1.0)
    canny = FT_CannyEdges().execute(img, 0.4, 0.8)[0]
    scrib = FT_Scribble().execute(img, 0.3, 5)[0]
    assert set(torch.unique(scrib).tolist()) <= {0.0, 1.0} and scrib.sum() > 2 * canny.sum()
    tile = FT_TileBlur().execute(img, 8.0, 1.0)[0]
    hf = lambda x: float((x[:, 1:] - x[:, :-1]).abs().mean())  # noqa: E731
    assert tile.shape == img.shape and hf(tile) < hf(img)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="image must be an IMAGE batch.*MASK"):
        FT_CannyEdges().execute(torch.zeros(1, 32, 32), 0.4, 0.8)
    with pytest.raises(ValueError, match="image is an empty batch"):
        FT_SoftEdges().execute(torch.zeros(0, 32, 32, 3))
    with pytest.raises(ValueError, match="low_threshold 0.9 must not exceed high_threshold 0.2"):
        FT_CannyEdges().execute(square(), 0.9, 0.2)
