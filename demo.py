"""``python -m comfyui_finetune demo``: the toy world end to end, ending in pictures a newcomer can open.

1. runs the example workflow ``example_workflows/api/toy_text_to_image.json`` through the headless runner
   (the same JSON a real ComfyUI runs), and
2. samples every colour x shape of the toy world into one labelled overview, judged by the toy judge: the base
   model draws the shapes and colours it was trained on; purple and the cross are the new concepts that
   fine-tuning teaches.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def overview(model, judge, seed: int = 0):
    """Sample each colour x shape once; returns (PIL image, {"color_acc", "shape_acc"} over the base classes)."""
    from .trainers.grids import labelled_grid
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
    with torch.inference_mode(False):
        model = load_toy_model()
        img, acc = overview(model, load_toy_judge())
    grid_path = out / "demo_toy_overview.png"
    tmp = grid_path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(grid_path)
    summary = {"overview": str(grid_path), "workflow_images": [str(p) for p in saved],
               "base_color_acc": round(acc["color_acc"], 3), "base_shape_acc": round(acc["shape_acc"], 3),
               "seconds": round(time.time() - t0, 1)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
