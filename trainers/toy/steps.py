"""What the toy build's stages share: the learning-rate schedule, when to log, and clean shipped configs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def cosine(opt, steps: int, warmup: int, floor: float = 0.1):
    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        p = (i - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def every(i: int, n: int, total: int) -> bool:
    return (i + 1) % n == 0 or i + 1 == total


def no_build_paths(folder: Path) -> None:
    """No build-machine paths in shipped files: drop ``_name_or_path`` from every component's config."""
    for cfg_file in folder.glob("*/config.json"):
        cfg_json = json.loads(cfg_file.read_text())
        if cfg_json.pop("_name_or_path", None) is not None:
            cfg_file.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
