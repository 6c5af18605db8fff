"""Labelled image grids (the demo's overview, comparison figures)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    """Pillow's built-in scalable font (Pillow >= 10.1; the older bitmap font knows only Latin-1)."""
    return ImageFont.load_default(size=size)


def to_pil(image) -> Image.Image:
    """A HxWx3 float 0..1 tensor/array (one ComfyUI IMAGE entry) -> PIL image."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


def labelled_grid(cells: list[list], row_labels: list[str], col_labels: list[str], *, cell: int = 128,
                  title: str = "", notes: list[list[str]] | None = None) -> Image.Image:
    """Rows x columns of images (each HxWx3, 0..1), scaled to ``cell`` pixels with nearest-neighbour so small
    pictures stay sharp, with row and column labels and an optional caption under each cell."""
    font, small = _font(max(12, cell // 9)), _font(max(10, cell // 12))
    left = max([int(font.getlength(s)) for s in row_labels] + [0]) + 16
    top = (34 if title else 8) + max(18, cell // 7)
    note_h = (cell // 9 + 6) if notes else 0
    pad = 6
    w = left + len(col_labels) * (cell + pad)
    h = top + len(row_labels) * (cell + pad + note_h)
    img = Image.new("RGB", (w, h), (250, 250, 250))
    d = ImageDraw.Draw(img)
    if title:
        d.text((8, 6), title, fill=(20, 20, 20), font=font)
    for j, lab in enumerate(col_labels):
        x = left + j * (cell + pad) + cell // 2
        d.text((x, top - 6), lab, fill=(40, 40, 40), font=font, anchor="md")
    for i, (lab, row) in enumerate(zip(row_labels, cells)):
        y = top + i * (cell + pad + note_h)
        d.text((left - 8, y + cell // 2), lab, fill=(40, 40, 40), font=font, anchor="rm")
        for j, im in enumerate(row):
            x = left + j * (cell + pad)
            img.paste(to_pil(im).resize((cell, cell), Image.NEAREST), (x, y))
            if notes:
                d.text((x + cell // 2, y + cell + 2), notes[i][j], fill=(90, 90, 90), font=small, anchor="ma")
    return img
