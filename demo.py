"""``python -m comfyui_finetune demo``: the toy world end to end, ending in pictures a newcomer can open.

1. runs the example workflow ``example_workflows/api/toy_text_to_image.json`` through the headless runner
   (the same JSON a real ComfyUI runs),
2. samples every colour x shape of the toy world into one labelled overview, judged by the toy judge: the base
   model draws the shapes and colours it was trained on; purple and the cross are the new concepts that
   fine-tuning teaches, and
3. runs ``example_workflows/api/toy_train_lora.json``: a LoRA learns "a sks star" = a purple star from 8
   pictures, and ``demo_lora.png`` shows the training pictures, the base model and the LoRA side by side.
4. runs ``example_workflows/api/toy_controlnet.json``: the built-in toy ControlNet places "a yellow square" where
   Canny edges of blue squares say (``demo_controlnet.png``), and measures how well it is followed (mask IoU).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def overview(model, judge, seed: int = 0):
    """Sample each colour x shape once; returns (PIL image, {"color_acc", "shape_acc"} over the base classes)."""
    from .trainers.eval.grids import labelled_grid
    from .trainers.sampling import sample
    from .trainers.toy import world

    cells, notes, hits = [], [], []
    base = set(world.base_classes())
    for color in world.COLORS:
        imgs = sample(model, [f"a {color} {s}" for s in world.SHAPES], seeds=[seed + i for i in range(len(world.SHAPES))],
                      steps=20, cfg=4.0)
        verdicts = judge.judge(imgs)
        cells.append(list(imgs))
        row = []
        for s, v in zip(world.SHAPES, verdicts):
            ok = v["color"] == color and v["shape"] == s
            tag = "trained" if (color, s) in base else "new"
            row.append(f"{tag}: {'ok' if ok else 'judged ' + str(v['color']) + ' ' + v['shape']}")
            if (color, s) in base:
                hits.append((v["color"] == color, v["shape"] == s))
        notes.append(row)
    img = labelled_grid(cells, list(world.COLORS), list(world.SHAPES), cell=128,
                        title="Toy base model: 'a <colour> <shape>' (purple and cross were never trained)",
                        notes=notes)
    acc = {"color_acc": sum(h[0] for h in hits) / len(hits), "shape_acc": sum(h[1] for h in hits) / len(hits)}
    return img, acc


def run_demo(out_dir: str | Path) -> dict:
    import torch

    from . import runner
    from .nodes import host
    from .trainers.toy.loader import load_toy_judge, load_toy_model

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    host.set_folders(output=out)
    t0 = time.time()
    workflow = Path(__file__).resolve().parent / "example_workflows" / "api" / "toy_text_to_image.json"
    ui = runner.run(runner.load_workflow(workflow), output_dir=out)
    saved = [out / i.get("subfolder", "") / i["filename"] for node in ui.values() for i in node.get("images", [])
             if i.get("type") == "output"]
    judge = load_toy_judge()
    with torch.inference_mode(False):
        model = load_toy_model()
        img, acc = overview(model, judge)
    grid_path = _save(img, out / "demo_toy_overview.png")
    lora_path, lora_rate = lora_figure(out, judge)
    cn_path, cn_iou = controlnet_figure(out, model)
    summary = {"overview": str(grid_path), "workflow_images": [str(p) for p in saved],
               "base_color_acc": round(acc["color_acc"], 3), "base_shape_acc": round(acc["shape_acc"], 3),
               "lora_figure": str(lora_path), "lora_concept_rate": lora_rate,
               "controlnet_figure": str(cn_path), "controlnet_iou": cn_iou,
               "seconds": round(time.time() - t0, 1)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _save(img, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def lora_figure(out: Path, judge) -> tuple[Path, dict]:
    """Run the LoRA example and show training pictures / base / LoRA for 'a sks star'."""
    import numpy as np
    from PIL import Image

    from . import runner
    from .trainers.eval.grids import labelled_grid

    workflow = Path(__file__).resolve().parent / "example_workflows" / "api" / "toy_train_lora.json"
    ui = runner.run(runner.load_workflow(workflow), output_dir=out)

    def images(node: str) -> list:
        files = [out / (i.get("subfolder") or "") / i["filename"] if i.get("type") == "output"
                 else out / "preview" / (i.get("subfolder") or "") / i["filename"] for i in ui[node]["images"]]
        return [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]

    rows = {"training pictures": images("8")[:4], "base model": images("9"), "with the LoRA": images("10")}
    notes, rate = [], {}
    for name, imgs in rows.items():
        verdicts = judge.judge(np.stack([(i * 255).round().astype(np.uint8) for i in imgs]))
        notes.append([f"{v['color']} {v['shape']}" for v in verdicts])
        rate[name] = sum(v["color"] == "purple" and v["shape"] == "star" for v in verdicts) / len(verdicts)
    fig = labelled_grid(list(rows.values()), list(rows), [f"#{i + 1}" for i in range(4)], cell=128, notes=notes,
                        title="LoRA on 8 pictures of a purple star, prompt 'a sks star' (judged under each)")
    return _save(fig, out / "demo_lora.png"), rate


def controlnet_figure(out: Path, model) -> tuple[Path, dict]:
    """Run the ControlNet example (edges / without / with control) and measure adherence on 8 off-centre shapes."""
    import shutil

    import torch

    from . import runner
    from .trainers.toy.control import adherence
    from .trainers.toy.loader import load_toy_controlnet

    workflow = Path(__file__).resolve().parent / "example_workflows" / "api" / "toy_controlnet.json"
    ui = runner.run(runner.load_workflow(workflow), output_dir=out)
    (saved,) = ui["9"]["images"]
    path = out / "demo_controlnet.png"
    shutil.copyfile(out / (saved.get("subfolder") or "") / saved["filename"], path)
    with torch.inference_mode(False):
        r = adherence(model, load_toy_controlnet(), n=8)
    return path, {"with control": r["mean_control"], "without": r["mean_none"]}
