"""The toy world's judge: which colour and which shape does a picture show?

Colour is measured, not learned: the mean colour of the foreground (pixels far from the border's colour), named
by the nearest palette entry. Shape comes from a small CNN trained on the synthetic pictures with a sixth class,
``none``, for blobs, fragments, half-erased shapes, blanks and noise, so a model that draws fragments is not
flattered. Used by the build's quality bar and by every learning test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .world import PALETTE, SHAPES

SHAPE_CLASSES = SHAPES + ("none",)


class ShapeNet(nn.Module):
    def __init__(self, n_classes: int = len(SHAPE_CLASSES), widths=(32, 64, 96)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x):  # x: (B, 3, 32, 32) in [-1, 1]
        return self.head(self.features(x).mean(dim=(2, 3)))


def to_judge_input(images) -> torch.Tensor:
    """Accept uint8 HxWx3 arrays, or ComfyUI IMAGE tensors (B,H,W,3 float 0..1); return (B,3,32,32) in [-1,1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
        x = x.permute(0, 3, 1, 2) * 2 - 1
    else:
        x = torch.from_numpy(np.stack(list(images)).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    if x.shape[-1] != 32 or x.shape[-2] != 32:
        x = F.interpolate(x, size=(32, 32), mode="area")
    return x.contiguous()


def judge_colors(x: torch.Tensor, min_fraction: float = 0.03) -> list[str | None]:
    """Name the foreground colour of each picture in ``x`` ((B,3,H,W) in [-1,1]); None when there is no foreground."""
    rgb = (x + 1) * 127.5
    names = list(PALETTE)
    pal = torch.tensor([PALETTE[n] for n in names], dtype=torch.float32)
    out: list[str | None] = []
    for img in rgb:
        border = torch.cat([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], dim=1)
        bg = border.median(dim=1).values
        dist = (img - bg[:, None, None]).norm(dim=0)
        fg = dist > 80
        if fg.float().mean() < min_fraction:
            out.append(None)
            continue
        mean = img[:, fg].mean(dim=1)
        out.append(names[int((pal - mean).norm(dim=1).argmin())])
    return out


class ToyJudge:
    def __init__(self, net: ShapeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, folder: str | Path) -> "ToyJudge":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        net = ShapeNet(len(cfg["classes"]), tuple(cfg["widths"]))
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(net)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        widths = [m.out_channels for m in self.net.features if isinstance(m, nn.Conv2d)][1::2]
        (folder / "config.json").write_text(json.dumps({"classes": list(SHAPE_CLASSES), "widths": widths}))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "model.safetensors"))

    @torch.no_grad()
    def shapes(self, images) -> list[str]:
        x = to_judge_input(images)
        with torch.inference_mode(False), torch.no_grad():
            logits = self.net(x)
        return [SHAPE_CLASSES[i] for i in logits.argmax(dim=1).tolist()]

    def judge(self, images) -> list[dict]:
        """[{"color": name|None, "shape": name}] for each picture."""
        x = to_judge_input(images)
        return [{"color": c, "shape": s} for c, s in zip(judge_colors(x), self.shapes(x.permute(0, 2, 3, 1) / 2 + 0.5))]
