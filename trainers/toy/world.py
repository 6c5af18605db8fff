"""The toy world: deterministic captioned pictures of flat coloured shapes.

Everything the built-in toy model knows comes from here. Pictures are drawn with PIL at 4x the target size and
downsampled, so edges are anti-aliased like real photographs of flat shapes. Every random choice comes from a
``numpy.random.Generator`` seeded by the caller, so a seed always gives the same pictures.

The base model is trained on :data:`BASE_COLORS` x :data:`BASE_SHAPES` minus :data:`HELD_OUT_COMBOS`. The colour
``purple`` and the shape ``cross`` are never shown to it: they are the new concepts that fine-tuning teaches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Named colours (RGB). The judge names the nearest of these.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 205, 25),
    "purple": (140, 40, 190),
}
BASE_COLORS = ("red", "green", "blue", "yellow")
NEW_COLORS = ("purple",)
COLORS = BASE_COLORS + NEW_COLORS

BASE_SHAPES = ("circle", "square", "triangle", "star")
NEW_SHAPES = ("cross",)
SHAPES = BASE_SHAPES + NEW_SHAPES

#: Colour/shape pairs the base model never sees although it knows both words (compositional gaps).
HELD_OUT_COMBOS = (("blue", "star"), ("yellow", "triangle"))

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}


def base_classes() -> list[tuple[str, str]]:
    """The (colour, shape) pairs the base model is trained on."""
    return [(c, s) for c in BASE_COLORS for s in BASE_SHAPES if (c, s) not in HELD_OUT_COMBOS]


def all_classes() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


@dataclass(frozen=True)
class Geometry:
    """Ranges for the random placement of a shape, as fractions of the image side."""

    radius: tuple[float, float] = (0.30, 0.36)
    center_jitter: float = 0.06
    rotation_deg: float = 15.0
    color_jitter: int = 8


#: Narrow geometry: centred, similar size, nearly upright. The base model learns crisp shapes from it.
NARROW = Geometry()
#: Broad geometry: any size, position and rotation (VAE, judge, ControlNet pictures).
BROAD = Geometry(radius=(0.16, 0.38), center_jitter=0.5, rotation_deg=180.0, color_jitter=16)


@dataclass
class Picture:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    color: str | None
    shape: str | None
    mask: np.ndarray = field(repr=False, default=None)  # (H, W) float 0..1, foreground coverage


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radius_at, phase: float = -math.pi / 2):
        return [
            (cx + radius_at(i) * math.cos(phase + rot + 2 * math.pi * i / n),
             cy + radius_at(i) * math.sin(phase + rot + 2 * math.pi * i / n))
            for i in range(n)
        ]

    if shape == "square":
        s = r * 0.86
        return ring(4, lambda i: s * math.sqrt(2), phase=-math.pi / 4)
    if shape == "triangle":
        # centroid-centred equilateral triangle, a little larger so its area matches the others
        return ring(3, lambda i: r * 1.18)
    if shape == "star":
        return ring(10, lambda i: r * 1.1 if i % 2 == 0 else r * 0.45)
    if shape == "cross":
        a, b = r * 1.0, r * 0.36  # arm half-length, arm half-width
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw_shape(
    shape: str,
    rgb: tuple[int, int, int],
    *,
    size: int = 32,
    background: tuple[int, int, int] = (255, 255, 255),
    center: tuple[float, float] = (0.5, 0.5),
    radius: float = 0.33,
    rotation_deg: float = 0.0,
    supersample: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one filled shape; returns (image uint8 HxWx3, coverage mask float HxW)."""
    big = size * supersample
    img = Image.new("RGB", (big, big), background)
    mask = Image.new("L", (big, big), 0)
    cx, cy, r = center[0] * big, center[1] * big, radius * big
    for target, fill in ((img, tuple(int(v) for v in rgb)), (mask, 255)):
        d = ImageDraw.Draw(target)
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon(_polygon(shape, cx, cy, r, math.radians(rotation_deg)), fill=fill)
    img = img.resize((size, size), Image.LANCZOS)
    mask = mask.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy(), np.asarray(mask, dtype=np.float32) / 255.0


def caption_for(color: str | None, shape: str | None, background: str, rng: np.random.Generator) -> str:
    """A caption in one of a few templates. Colour-only and shape-only captions teach the parts separately."""
    if color is None:
        return f"a {shape}" if rng.random() < 0.7 else f"a {shape} on a {background} background"
    if shape is None:
        return f"a {color} shape"
    r = rng.random()
    if r < 0.45:
        return f"a {color} {shape}"
    if r < 0.8:
        return f"a {color} {shape} on a {background} background"
    return f"a photo of a {color} {shape}"


def random_picture(
    rng: np.random.Generator,
    *,
    color: str,
    shape: str,
    geometry: Geometry = NARROW,
    background: str = "white",
    size: int = 32,
    rgb: tuple[int, int, int] | None = None,
    caption: str | None = None,
) -> Picture:
    """One picture of ``color`` ``shape`` with geometry drawn from ``geometry``."""
    base = np.array(PALETTE[color] if rgb is None else rgb, dtype=np.int64)
    jit = rng.integers(-geometry.color_jitter, geometry.color_jitter + 1, size=3) if geometry.color_jitter else 0
    fill = tuple(np.clip(base + jit, 0, 255).tolist())
    r = float(rng.uniform(*geometry.radius))
    # keep the whole shape inside the frame
    lim = max(0.0, min(geometry.center_jitter, 0.5 - r * 1.15))
    cx, cy = 0.5 + rng.uniform(-lim, lim), 0.5 + rng.uniform(-lim, lim)
    rot = float(rng.uniform(-geometry.rotation_deg, geometry.rotation_deg))
    img, mask = draw_shape(shape, fill, size=size, background=BACKGROUNDS[background], center=(cx, cy),
                           radius=r, rotation_deg=rot)
    if caption is None:
        caption = caption_for(color, shape, background, rng)
    return Picture(img, caption, color, shape, mask)


def base_training_set(n: int, seed: int, size: int = 32) -> list[Picture]:
    """The base model's training pictures: narrow geometry, white background, base classes only.

    15 % of captions name only the shape and 5 % only the colour, so "a circle" (a class prompt) means something.
    """
    rng = np.random.default_rng(seed)
    classes = base_classes()
    out = []
    for i in range(n):
        color, shape = classes[i % len(classes)]
        pic = random_picture(rng, color=color, shape=shape, size=size)
        r = rng.random()
        if r < 0.15:
            pic.caption = caption_for(None, shape, "white", rng)
        elif r < 0.20:
            pic.caption = caption_for(color, None, "white", rng)
        out.append(pic)
    order = rng.permutation(n)
    return [out[i] for i in order]


def concept_set(color: str, shape: str, n: int, seed: int, caption: str, *, size: int = 32,
                geometry: Geometry = NARROW) -> list[Picture]:
    """A small fine-tuning set of one concept, every picture with the same caption (e.g. "a sks star")."""
    rng = np.random.default_rng(seed)
    return [random_picture(rng, color=color, shape=shape, geometry=geometry, size=size, caption=caption)
            for _ in range(n)]


def varied_set(color: str | None, shape: str | None, n: int, seed: int, caption: str, *, size: int = 32,
               geometry: Geometry = NARROW) -> list[Picture]:
    """Pictures whose colour and/or shape vary (``None`` = any base colour / shape, never a held-out pairing);
    ``{color}`` and ``{shape}`` in ``caption`` are filled in per picture."""
    if color and shape:  # one class: the same pictures as concept_set
        return concept_set(color, shape, n, seed, caption.replace("{color}", color).replace("{shape}", shape),
                           size=size, geometry=geometry)
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c, s in all_classes()
               if (c == color if color else c in BASE_COLORS) and (s == shape if shape else s in BASE_SHAPES)
               and (c, s) not in HELD_OUT_COMBOS]
    out = []
    for _ in range(n):
        c, s = classes[int(rng.integers(len(classes)))]
        out.append(random_picture(rng, color=c, shape=s, geometry=geometry, size=size,
                                  caption=caption.replace("{color}", c).replace("{shape}", s)))
    return out


def blob_picture(rng: np.random.Generator, size: int = 32, background=(255, 255, 255),
                 rgb: tuple[int, int, int] | None = None) -> np.ndarray:
    """A smooth irregular blob, an ellipse or a few fragments: pictures that are no shape at all."""
    big = size * 4
    if rgb is None:
        rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (big, big), background)
    d = ImageDraw.Draw(img)
    kind = rng.integers(0, 3)
    if kind == 0:  # ellipse, clearly not a circle
        w, h = rng.uniform(0.25, 0.45) * big, rng.uniform(0.06, 0.16) * big
        cx, cy = rng.uniform(0.35, 0.65) * big, rng.uniform(0.35, 0.65) * big
        poly = []
        a = rng.uniform(0, math.pi)
        for t in np.linspace(0, 2 * math.pi, 40, endpoint=False):
            x, y = w * math.cos(t), h * math.sin(t)
            poly.append((cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)))
        d.polygon(poly, fill=rgb)
    elif kind == 1:  # random smooth blob from a noisy radius
        cx, cy, r0 = big / 2 + rng.uniform(-8, 8), big / 2 + rng.uniform(-8, 8), rng.uniform(0.15, 0.35) * big
        k = rng.normal(0, 0.35, 6)
        poly = []
        for t in np.linspace(0, 2 * math.pi, 60, endpoint=False):
            rr = r0 * (1 + sum(k[j] * math.sin((j + 1) * t + k[(j + 3) % 6]) / (j + 1) for j in range(6)) * 0.6)
            poly.append((cx + max(rr, 4) * math.cos(t), cy + max(rr, 4) * math.sin(t)))
        d.polygon(poly, fill=rgb)
    else:  # 2-5 fragments
        for _ in range(int(rng.integers(2, 6))):
            cx, cy, r = rng.uniform(0.15, 0.85) * big, rng.uniform(0.15, 0.85) * big, rng.uniform(0.04, 0.12) * big
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 3))))
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8).copy()


def to_tensor_batch(images: list[np.ndarray]):
    """uint8 HxWx3 pictures -> float tensor (B, 3, H, W) in [-1, 1]."""
    import torch

    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
