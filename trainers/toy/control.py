"""The toy world's ControlNet: its training pictures, its conditions, and how well a ControlNet is followed.

Adherence is measured as mask IoU: the generated picture's foreground (pixels clearly away from the white
background) against the filled shape whose edges made the condition.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import world

#: Canny thresholds for toy pictures: ComfyUI's default 0.4/0.8 misses yellow on white (low luminance contrast)
CANNY = {"low_threshold": 0.1, "high_threshold": 0.2}
#: off-centre placements used to judge adherence: a base model without control draws its shapes in the middle
PLACES = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))


def control_classes() -> list[tuple[str, str]]:
    return [(c, s) for c, s in world.base_classes() if (c, s) not in world.HELD_OUT_COMBOS]


def training_pictures(n: int, seed: int) -> list[world.Picture]:
    """Broad-geometry pictures (any size, place, rotation): the condition, not the base model, carries position."""
    rng = np.random.default_rng(seed)
    classes = control_classes()
    return [world.random_picture(rng, color=c, shape=s, geometry=world.BROAD)
            for c, s in (classes[int(rng.integers(len(classes)))] for _ in range(n))]


def targets(n: int, seed: int = 123, radius: float = 0.22) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """``n`` off-centre filled shapes: (colour, shape, picture uint8 HxWx3, mask bool HxW)."""
    rng = np.random.default_rng(seed)
    classes = control_classes()
    out = []
    for k in range(n):
        c, s = classes[k % len(classes)]
        cx, cy = PLACES[int(rng.integers(len(PLACES)))]
        img, mask = world.draw_shape(s, world.PALETTE[c], center=(cx, cy), radius=radius,
                                     rotation_deg=float(rng.uniform(-20, 20)))
        out.append((c, s, img, mask > 0.5))
    return out


def foreground(images, tolerance: float = 0.25) -> np.ndarray:
    """(B, H, W, 3) IMAGE in 0..1 -> (B, H, W) bool: pixels farther than ``tolerance`` from white in any channel."""
    x = np.asarray(images, dtype=np.float32)
    return (1.0 - x).max(axis=-1) > tolerance


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def adherence(model, control_net, n: int = 16, *, seed: int = 123, steps: int = 20, cfg: float = 4.0,
              strength: float = 1.0) -> dict:
    """Sample each target's prompt with and without the ControlNet (same seed) and report the mask IoUs."""
    import torch

    from ..adapters.controlnet.apply import Control
    from ..data.preprocess import canny
    from ..sampling import sample

    with_c, without = [], []
    for k, (c, s, img, mask) in enumerate(targets(n, seed)):
        cond = canny(torch.from_numpy(img).float()[None] / 255, **CANNY)
        prompt = f"a {c} {s}"
        ctl = sample(model, prompt, seeds=[k], steps=steps, cfg=cfg,
                     controls=[Control(control_net, cond, strength)])
        free = sample(model, prompt, seeds=[k], steps=steps, cfg=cfg)
        with_c.append(iou(foreground(ctl)[0], mask))
        without.append(iou(foreground(free)[0], mask))
    w, wo = np.array(with_c), np.array(without)
    return {"n": n, "iou_control": [round(float(v), 3) for v in w], "iou_none": [round(float(v), 3) for v in wo],
            "mean_control": round(float(w.mean()), 3), "mean_none": round(float(wo.mean()), 3),
            "share_control_ge_0.6": round(float((w >= 0.6).mean()), 3)}


# ------------------------------------------------------------------------------------------------ controlnet --
def train_controlnet(cfg, out: Path) -> dict:
    """The toy build's ControlNet stage (``cfg`` is its BuildConfig): the toy ControlNet, trained by the pack's own
    ControlNet trainer (the shared loop) on Canny edges of broad-geometry pictures; saved as a diffusers folder in
    fp32."""
    import json
    import shutil
    import tempfile
    import time

    from ..methods.controlnet import ControlNetMethod
    from ..data.dataset import Dataset, Example
    from ..loop.training import train
    from ..config.recipes import TrainConfig
    from ..runs.run_dir import RunDir
    from .loader import load_toy_model

    model = load_toy_model(out)
    pics = training_pictures(cfg.controlnet_images, cfg.seed + 5)
    ds = Dataset([Example(p.image, p.caption, f"{i}.png") for i, p in enumerate(pics)], name="toy-controlnet",
                 caption_dropout=cfg.controlnet_caption_dropout, source="toy world, broad geometry")
    method = ControlNetMethod("canny", CANNY, name="toy canny")
    tcfg = TrainConfig(steps=cfg.controlnet_steps, learning_rate=cfg.controlnet_lr, batch_size=cfg.batch_size,
                       seed=cfg.seed + 5, lr_scheduler="cosine", warmup_steps=50)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model.share(), ds, method, tcfg, RunDir.create(Path(tmp), "toy-controlnet"))
    seconds = time.time() - t0
    cn = method.result()
    folder = out / "controlnet"
    tmp_folder = folder.with_name("controlnet.tmp")
    shutil.rmtree(tmp_folder, ignore_errors=True)
    cn.net.save_pretrained(str(tmp_folder), safe_serialization=True)
    cfg_file = tmp_folder / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json.pop("_name_or_path", None)
    cfg_file.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp_folder.replace(folder)
    report = adherence(model, cn, n=32)
    losses = [r["loss"] for r in result.log]
    return {"seconds": round(seconds, 1), "steps": cfg.controlnet_steps,
            "ms_per_step": round(1000 * seconds / cfg.controlnet_steps, 1),
            "final_loss_mean50": round(float(np.mean(losses[-50:])), 4),
            "mb": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20, 2),
            **{k: v for k, v in report.items() if not k.startswith("iou_")}}
