"""What the canvas gets from the nodes, checked without a browser: the training nodes' progress events and kept chart
history, the folded advanced options, what the dataset loaders show, and example layouts whose links are consistent
(tests/test_browser.py checks the same in the real front end when a ComfyUI and a Chromium are at hand)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_finetune import NODE_CLASS_MAPPINGS
from comfyui_finetune.nodes import host
from comfyui_finetune.nodes import train as train_nodes
from comfyui_finetune.nodes.datasets import FT_LoadImageDataset, FT_ToyDataset
from comfyui_finetune.trainers.config.recipes import METHODS, TrainConfig
from comfyui_finetune.trainers.runs.run_dir import TrainingLog

PACK = Path(__file__).resolve().parent.parent


def toy_set(n=4):
    return FT_ToyDataset().execute("purple", "star", n, "a sks star", 0, "narrow")[0]


def test_progress_events_carry_every_step_and_the_ui_keeps_the_history(toy, folders, monkeypatch):
    events = []
    monkeypatch.setattr(host, "send_event", lambda name, data: events.append((name, data)))
    out = train_nodes.FT_TrainLoRA().train(toy, toy_set(), steps=12, learning_rate=1e-3, batch_size=2, rank=4,
                                           alpha=4.0, seed=1, target_modules="attention", train_text_encoder=False,
                                           text_encoder_lr=0.0, run_name="chart", validation_prompt="a sks star",
                                           validation_every=6, validation_images=1)
    progress = [d for n, d in events if n == "finetune.progress"]
    assert 1 <= len(progress) <= 12
    steps = [p[0] for d in progress for p in d["points"]]
    assert steps == list(range(1, 13))  # throttled events, but no step lost
    assert progress[-1]["step"] == progress[-1]["total"] == 12 and progress[-1]["eta_s"] == 0
    log = out["result"][2]
    chart = out["ui"]["finetune_chart"][0]
    assert chart["run"] == log.run and chart["total"] == 12
    assert [p[1] for p in chart["points"]] == log.losses()
    images = out["ui"]["images"]  # the last validation pictures, from the run folder ComfyUI serves as output
    assert [i["filename"] for i in images] == ["step-12-0.png"]
    assert all((folders["output"] / i["subfolder"] / i["filename"]).is_file() for i in images)


def test_chart_history_is_bounded_and_keeps_both_ends(folders):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "seconds": s * 0.1} for s in range(1, 5001)]
    log = TrainingLog(rows, {"recipe": {"steps": 6000}}, "long", 5000, 500.0)
    chart = train_nodes.chart_ui(log)["finetune_chart"][0]
    steps = [p[0] for p in chart["points"]]
    assert len(steps) == train_nodes.CHART_POINTS and steps[0] == 1 and steps[-1] == 5000
    assert steps == sorted(set(steps)) and chart["total"] == 6000
    short = train_nodes.chart_ui(TrainingLog(rows[:30], {"recipe": {"steps": 30}}, "short", 30, 3.0))
    assert len(short["finetune_chart"][0]["points"]) == 30 and short["images"] == []
    samples = folders["output"] / "finetune" / "short" / "samples"
    samples.mkdir(parents=True)
    for name in ("step-9-0.png", "step-30-10.png", "step-30-2.png", "step-best.png", "notes.png"):
        (samples / name).write_bytes(b"")
    shown = train_nodes.chart_ui(TrainingLog(rows[:30], {"recipe": {"steps": 30}}, "short", 30, 3.0))["images"]
    assert [i["filename"] for i in shown] == ["step-30-2.png", "step-30-10.png"]  # the last step's, in order


def test_advanced_options_are_folded_and_the_essentials_stay_in_view():
    for cls in (c for c in NODE_CLASS_MAPPINGS.values() if getattr(c, "METHOD", None)):
        spec = cls.INPUT_TYPES()
        inputs = {**spec["required"], **spec["optional"]}
        folded = {n for n, s in inputs.items() if len(s) > 1 and s[1].get("advanced")}
        recipe = METHODS[cls.METHOD].recipe
        assert folded == set(recipe.advanced), cls.__name__
        assert {"optimizer", "lr_scheduler", "grad_accum", "mixed_precision", "save_every"} <= folded
        for essential in ("steps", "learning_rate", "batch_size", "seed", "run_name", "validation_prompt",
                          "resume_run"):
            assert essential in inputs and essential not in folded, (cls.__name__, essential)
        assert set(recipe.advanced) <= set(recipe.options()), cls.__name__
        shown = [n for n, s in inputs.items() if n not in folded and (isinstance(s[0], list) or s[0] in (
            "INT", "FLOAT", "STRING", "BOOLEAN"))]
        assert len(shown) <= (14 if cls.METHOD == "lora" else 20), f"{cls.__name__} shows {len(shown)} widgets"
    assert set(TrainConfig.advanced) < set(TrainConfig.LOOP_OPTIONAL + TrainConfig.LATER)


def test_folded_options_still_reach_the_recipe(toy, folders):
    """A folded widget keeps its value: the node trains with it (here an optimizer and a schedule set by name)."""
    out = train_nodes.FT_TrainLoRA().execute(toy, toy_set(), steps=2, learning_rate=1e-3, batch_size=2, rank=4,
                                             alpha=4.0, seed=1, target_modules="attention", train_text_encoder=False,
                                             text_encoder_lr=0.0, run_name="folded", optimizer="sgd",
                                             lr_scheduler="linear")
    config = out[2].config["recipe"]
    assert config["optimizer"] == "sgd" and config["lr_scheduler"] == "linear"


def test_dataset_loader_shows_count_captions_and_warnings(folders, monkeypatch):
    root = folders["input"] / "pets"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(f"a photo of <b>pet</b> {i}")
    (root / "broken.png").write_bytes(b"not a picture")
    (root / "orphan.txt").write_text("no picture here")
    out = FT_LoadImageDataset().load("pets", "a photo of {token}", "sks")
    text = out["ui"]["text"][0].splitlines()
    assert text[0].startswith("6 pictures x 1 repeats")
    assert "p0.png: a photo of <b>pet</b> 0" in text  # captions as written: the front end shows them as text
    assert any("1 file(s) skipped" in t and "broken.png" in t for t in text)
    assert any("without a picture" in t and "orphan.txt" in t for t in text)
    assert "images" not in out["ui"]  # no ComfyUI temp folder outside ComfyUI: no thumbnails written
    monkeypatch.setattr(host, "temp_dir", lambda: folders["output"] / "temp")
    shown = FT_LoadImageDataset().load("pets", "a photo of {token}", "sks")["ui"]["images"]
    assert len(shown) == 4 and all(i["type"] == "temp" for i in shown)
    for i in shown:
        assert max(Image.open(folders["output"] / "temp" / i["filename"]).size) <= 128


@pytest.mark.parametrize("path", sorted((PACK / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_example_ui_links_point_at_the_sockets_they_name(path):
    """Each link's target slot is the input of that index, holding that link and of that type; nodes do not overlap
    as laid out (the browser test checks them again after they ran and grew)."""
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == kind, (nodes[dst]["type"], target, kind)
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30) for n in wf["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3])


def test_every_template_has_its_thumbnail():
    """ComfyUI's template browser shows example_workflows/<name>.jpg beside <name>.json (a square card)."""
    for wf in sorted((PACK / "example_workflows").glob("*.json")):
        thumb = wf.with_suffix(".jpg")
        assert thumb.is_file(), f"{wf.name} has no thumbnail {thumb.name}"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size[0] == im.size[1] >= 256, (thumb.name, im.format, im.size)
