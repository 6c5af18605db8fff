"""Keeping the best checkpoint by score: when later checkpoints get worse by construction (noise poured into the
LoRA after a step), the result is an earlier, better-scoring checkpoint; early stopping ends the run there; the
scores are in log.jsonl and status.json; what keep_best needs is asked for by name."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.trainers.adapters import tuners as adapters
from comfyui_finetune.trainers.methods.lora import LoRAMethod, kohya_key
from comfyui_finetune.trainers.config.recipes import LoRARecipe
from comfyui_finetune.trainers.runs.run_dir import RunDir


@pytest.fixture(scope="module")
def scorer():
    from comfyui_finetune.trainers.eval.metrics import load_clip_scorer
    from comfyui_finetune.trainers.toy.loader import WEIGHTS

    return load_clip_scorer(WEIGHTS / "clip")


def toy_set():
    return FT_ToyDataset().execute("purple", "star", 8, "a sks star", 0, "narrow")[0]


def spoil_after(monkeypatch, step: int) -> None:
    """From optimizer step ``step`` + 1 on, noise is added to the LoRA's weights: every later checkpoint is worse."""
    count = {"n": 0}

    def after_step(self):
        count["n"] += 1
        if count["n"] > step:
            g = torch.Generator().manual_seed(count["n"])
            with torch.no_grad():
                for p in adapters.parameters(self.model.unet, self.adapter):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)

    monkeypatch.setattr(LoRAMethod, "after_step", after_step)


def run(toy, tmp_path, name, scorer, callbacks=None, **kw):
    from comfyui_finetune.trainers.methods.lora import train_lora

    args = dict(steps=90, batch_size=4, learning_rate=1e-3, seed=0, rank=8, target_modules="attention+feedforward",
                save_every=30, validation_prompt="a sks star", validation_images=4, keep_best="clip_i", run_name=name,
                validation_cfg=4.0)  # the spoiled checkpoints score lower at cfg 4 (measured), as these tests need
    args.update(kw)
    with torch.inference_mode(False):
        return train_lora(LoRARecipe(**args), toy, toy_set(), RunDir.create(tmp_path, name), callbacks,
                          scorer=scorer)


def checkpoint_lora(run_dir, step: int) -> dict:
    from safetensors.torch import load_file

    out = {}
    for k, v in load_file(str(run_dir / "checkpoints" / f"step-{step}" / "trainable.safetensors")).items():
        part, rest = k.split(".", 1)
        kind = "lora_down" if ".lora_A." in rest else "lora_up"
        mod = rest.split(".lora_A.")[0] if kind == "lora_down" else rest.split(".lora_B.")[0]
        out[f"{kohya_key(part, mod)}.{kind}.weight"] = v
    return out


def scores(run_dir) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "score" in r}


def test_a_worse_late_checkpoint_leaves_the_result_at_the_best_one(toy, tmp_path, scorer, monkeypatch):
    from comfyui_finetune.nodes.train import chart_ui
    from comfyui_finetune.trainers.loop.training import Callbacks
    from comfyui_finetune.trainers.runs.run_dir import TrainingLog

    spoil_after(monkeypatch, 60)
    seen = []
    t = run(toy, tmp_path, "best", scorer, Callbacks(on_score=lambda step, s, best: seen.append((step, s, best))))
    folder = tmp_path / "best"
    got = scores(folder)
    assert sorted(got) == [30, 60, 90]
    status = json.loads((folder / "status.json").read_text())
    best = status["best_step"]
    print({s: round(r["score"], 4) for s, r in got.items()}, "best", best)
    assert best == t.best_step and best in (30, 60)
    assert got[best]["score"] > got[90]["score"] and status["best_score"] == got[best]["score"]
    want = checkpoint_lora(folder, best)
    assert all(torch.equal(t.result.state[k], want[k]) for k in want), "the result is the best checkpoint's LoRA"
    assert (folder / "samples" / f"step-{best}-0.png").is_file()
    # the node's chart: live events as each save point is scored, and the kept history with the best step
    assert [(s, sc["score"]) for s, sc, _ in seen] == [(s, got[s]["score"]) for s in (30, 60, 90)]
    assert seen[-1][2] == best
    chart = chart_ui(TrainingLog.from_result(t))["finetune_chart"][0]
    assert chart["best_step"] == best
    assert chart["scores"] == [[s, got[s]["score"], got[s]["clip_t"], got[s]["clip_i"]] for s in (30, 60, 90)]


def test_early_stopping_ends_the_run_after_saves_without_improvement(toy, tmp_path, scorer, monkeypatch):
    spoil_after(monkeypatch, 30)
    t = run(toy, tmp_path, "early", scorer, steps=150, early_stop_after=1)
    folder = tmp_path / "early"
    status = json.loads((folder / "status.json").read_text())
    got = scores(folder)
    print({s: round(r["score"], 4) for s, r in got.items()})
    assert status["stopped_early"] and status["step"] == 60 and t.step == 60 and sorted(got) == [30, 60]
    assert status["best_step"] == 30 and got[30]["score"] > got[60]["score"]
    want = checkpoint_lora(folder, 30)
    assert all(torch.equal(t.result.state[k], want[k]) for k in want)


@pytest.mark.parametrize("kw,message", [
    ({"validation_prompt": "a sks star"}, "keep_best 'clip_i' scores checkpoints with CLIP: connect a Load CLIP "
                                          "Scorer node"),
    ({"with_scorer": True, "validation_prompt": ""}, "keep_best 'clip_i' scores the pictures of validation_prompt"),
    ({"with_scorer": True, "validation_prompt": "a", "save_every": 0}, "keep_best 'clip_i' compares checkpoints: "
                                                                       "set save_every"),
    ({"with_scorer": True, "keep_best": "off", "early_stop_after": 2}, "early_stop_after stops when the score stops "
                                                                       "improving: set keep_best too"),
])
def test_what_keep_best_needs_is_asked_for_by_name(toy, tmp_path, scorer, kw, message):
    from comfyui_finetune.trainers.methods.lora import train_lora

    args = dict(steps=2, batch_size=2, save_every=1, keep_best="clip_i", validation_prompt="a sks star")
    use = scorer if kw.pop("with_scorer", False) else None
    args.update(kw)
    with pytest.raises(ValueError, match=message), torch.inference_mode(False):
        train_lora(LoRARecipe(**args), toy, toy_set(), RunDir.create(tmp_path, "x"), scorer=use)
