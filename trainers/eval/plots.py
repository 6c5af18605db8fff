"""Plots drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .grids import _font


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average with bias correction, so its start is the mean of the first values."""
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc / (1 - (1 - alpha) ** t))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo or abs(hi) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def loss_plot(losses: list[float], width: int = 768, height: int = 384, title: str = "") -> Image.Image:
    """Raw loss (light) and its moving average (dark) against the step."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(12)
    left, right, top, bottom = 64, 16, 28, 36
    d.text((left, 6), title or "training loss", fill=(20, 20, 20), font=font)
    pw, ph = width - left - right, height - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=(180, 180, 180))
    vals = [v for v in losses if math.isfinite(v)]
    if not vals:
        d.text((left + 10, top + 10), "no loss values", fill=(120, 0, 0), font=font)
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    n = len(losses)

    def xy(i, v):
        x = left + (i / max(1, n - 1)) * pw
        return x, top + ph - (v - lo) / (hi - lo) * ph

    for t in _ticks(lo, hi):
        y = xy(0, t)[1]
        d.line([left, y, left + pw, y], fill=(235, 235, 235))
        d.text((left - 6, y), f"{t:.3g}", fill=(80, 80, 80), font=font, anchor="rm")
    for t in _ticks(1, n):
        x = xy(t - 1, lo)[0]
        d.text((x, top + ph + 6), f"{int(t)}", fill=(80, 80, 80), font=font, anchor="ma")
    d.text((left + pw // 2, height - 14), "step", fill=(80, 80, 80), font=font, anchor="ma")
    pts = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if len(pts) > 1:
        d.line(pts, fill=(160, 190, 230), width=1)
        smooth = ema([v for v in losses if math.isfinite(v)], 2 / (1 + min(50, max(2, n // 10))))
        d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 70, 160), width=2)
    else:
        x, y = pts[0]
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 70, 160))
    return img
