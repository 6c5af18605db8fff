"""learning_rate 0 = auto: each family's rate per method, scaled per adapter kind and optimizer; said in the log and
the run's config.json; a typed rate is kept as it is."""
from __future__ import annotations

import json
import logging
import math
import re

import pytest

from comfyui_finetune.trainers.config.recipes import (ControlNetRecipe, DreamBoothRecipe, LoRARecipe,
                                                     TextualInversionRecipe)
from comfyui_finetune.trainers.families.registry import FAMILIES
from comfyui_finetune.trainers.model.model import FTModel
from comfyui_finetune.trainers.adapters.kinds import LR_SCALE


class _Model:
    """What resolve_auto asks of a model: its family, its name and its own guidance (FTModel's, unchanged)."""
    name, sample_cfg = "stub", 0.0
    guidance = FTModel.guidance

    def __init__(self, family):
        self.family = FAMILIES[family]


def auto(family, recipe):
    from comfyui_finetune.trainers.loop.session import resolve_auto

    got, extra = resolve_auto(recipe, _Model(family), {"subjects": []})
    assert extra["subjects"] == []
    return got.learning_rate, extra.get("chosen", {}).get("learning_rate")


@pytest.mark.parametrize("family, recipe, want", [
    ("toy", LoRARecipe(), 1e-3),
    ("toy_xl", LoRARecipe(), 1e-3),
    ("toy_audio", LoRARecipe(), 1e-3),
    ("sd15", LoRARecipe(), 1e-4),
    ("sdxl", LoRARecipe(), 1e-4),
    ("toy", LoRARecipe(adapter="lokr"), 1e-3 * LR_SCALE["lokr"][0]),
    ("sd15", LoRARecipe(adapter="lokr"), 1e-4 * LR_SCALE["lokr"][0]),
    ("toy", LoRARecipe(adapter="loha"), 1e-3),
    ("toy", LoRARecipe(adapter="dora"), 1e-3),
    ("toy", DreamBoothRecipe(), 2e-3),
    ("toy_xl", DreamBoothRecipe(), 2e-3),
    ("toy_zimage", DreamBoothRecipe(), 2e-3),
    ("toy_zimage", DreamBoothRecipe(mode="full"), 2e-4),  # not measured: the toys' rate
    ("toy", DreamBoothRecipe(adapter="lokr"), 2e-3 * LR_SCALE["lokr"][0]),
    ("toy", DreamBoothRecipe(mode="full"), 4e-4),
    ("toy", DreamBoothRecipe(mode="full", adapter="lokr"), 4e-4),  # no adapter in full mode
    ("toy_audio", DreamBoothRecipe(mode="full"), 2e-4),  # not measured: the toys' rate
    ("sd15", DreamBoothRecipe(mode="full"), 5e-6),
    ("sd2", DreamBoothRecipe(), 1e-4),
    ("toy", TextualInversionRecipe(), 2e-2),
    ("sdxl", TextualInversionRecipe(), 5e-3),
    ("toy", ControlNetRecipe(), 1e-3),
    ("sd15", ControlNetRecipe(), 1e-5),
    ("toy", LoRARecipe(optimizer="prodigy"), 1.0),
    ("sd15", LoRARecipe(optimizer="lion"), float(f"{1e-4 / 3:.3g}")),
    ("toy", LoRARecipe(optimizer="lion", adapter="lokr"), float(f"{4e-3 / 3:.3g}")),
])
def test_auto_resolves_from_the_family_the_method_the_kind_and_the_optimizer(family, recipe, want):
    lr, why = auto(family, recipe)
    assert lr == pytest.approx(want) and why.startswith("auto: ")
    assert FAMILIES[family].label in why


def test_a_typed_rate_is_kept():
    assert auto("toy", LoRARecipe(learning_rate=5e-4, adapter="lokr")) == (5e-4, None)
    assert auto("sd15", LoRARecipe(learning_rate=0.5, optimizer="prodigy")) == (0.5, None)
    assert auto("toy", LoRARecipe(learning_rate=2e-3, optimizer="lion")) == (2e-3, None)


def test_every_family_has_a_rate_for_every_method():
    from comfyui_finetune.trainers.config.recipes import METHODS

    for fam in FAMILIES.values():
        for name, entry in METHODS.items():
            if name in dict(fam.not_yet):  # refused by name before any rate is asked (Z-Image's TI, ControlNet)
                continue
            assert auto(fam.name, entry.recipe())[0] > 0, (fam.name, name)


@pytest.mark.parametrize("recipe", [LoRARecipe, DreamBoothRecipe, TextualInversionRecipe, ControlNetRecipe])
def test_the_tooltip_says_what_auto_picks(recipe):
    """The help text names the rate auto picks on real SD and on the toys (one table, read here)."""
    help_text = recipe.options()["learning_rate"].metadata["help"]
    assert "0 = auto" in help_text and recipe().learning_rate == 0
    said = {float(x) for x in re.findall(r"\b\d+(?:\.\d+)?(?:e-\d+)?\b", help_text)}
    modes = [recipe(mode="full"), recipe()] if recipe is DreamBoothRecipe else [recipe()]
    for fam in ("toy", "sd15"):
        for r in modes:
            assert any(math.isclose(auto(fam, r)[0], x) for x in said), (fam, r, help_text)
    if recipe is LoRARecipe:
        assert f"x{LR_SCALE['lokr'][0]:g} for lokr" in help_text


def test_the_run_says_what_auto_chose(toy, folders, caplog):
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    ds = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0]
    with caplog.at_level(logging.INFO):
        _, lora, log = FT_TrainLoRA().execute(toy, ds, steps=2, batch_size=2, adapter="lokr", run_name="auto")
    want = 1e-3 * LR_SCALE["lokr"][0]
    assert any(f"learning_rate {want:g} (auto: " in r.getMessage() for r in caplog.records)
    config = json.loads((folders["output"] / "finetune" / log.run / "config.json").read_text())
    assert config["recipe"]["learning_rate"] == pytest.approx(want)
    assert "lokr" in config["chosen"]["learning_rate"]
    assert log.rows[0]["lr"] == pytest.approx(want)
    from comfyui_finetune.trainers.runs.export import lora_metadata

    assert float(lora_metadata(lora)["ss_learning_rate"]) == pytest.approx(want)


@pytest.mark.parametrize("family, recipe, want", [
    ("toy", LoRARecipe(), "attention+feedforward+conv"),
    ("toy_xl", DreamBoothRecipe(), "attention+feedforward+conv"),
    ("sd15", LoRARecipe(), "attention"),
    ("sdxl", LoRARecipe(), "attention"),
    ("sd2", DreamBoothRecipe(), "attention+feedforward"),
    ("toy", LoRARecipe(target_modules="attention"), "attention"),  # a chosen preset is kept
])
def test_auto_targets_come_from_the_family(family, recipe, want):
    from comfyui_finetune.trainers.loop.session import resolve_auto

    got, extra = resolve_auto(recipe, _Model(family), None)
    assert got.target_modules == want
    assert ("target_modules" in extra.get("chosen", {})) == (recipe.target_modules == "auto")


@pytest.mark.parametrize("recipe", [LoRARecipe, DreamBoothRecipe])
def test_the_targets_tooltip_says_what_auto_picks(recipe):
    from comfyui_finetune.trainers.loop.session import resolve_auto

    help_text = recipe.options()["target_modules"].metadata["help"]
    assert recipe().target_modules == "auto"
    for fam in ("toy", "sd15"):
        preset = resolve_auto(recipe(), _Model(fam), None)[0].target_modules
        assert re.search(rf"\b{re.escape(preset)}\b(?!\+)", help_text), (fam, preset, help_text)


def test_a_resume_compares_the_targets_auto_resolves_to(toy, folders):
    """A run started with auto resumes with auto (the same preset); asked for another preset, the resume names it."""
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    ds = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0]
    _, _, log = FT_TrainLoRA().execute(toy, ds, steps=2, batch_size=2, run_name="targets")
    config = json.loads((folders["output"] / "finetune" / log.run / "config.json").read_text())
    assert config["recipe"]["target_modules"] == "attention+feedforward+conv"
    assert config["chosen"]["target_modules"].startswith("auto: ")
    FT_TrainLoRA().execute(toy, ds, steps=3, batch_size=2, run_name="targets", resume_run=log.run)
    with pytest.raises(ValueError, match="target_modules is 'attention\\+feedforward\\+conv' in the run, "
                                         "'attention' here"):
        FT_TrainLoRA().execute(toy, ds, steps=4, batch_size=2, run_name="targets", resume_run=log.run,
                               target_modules="attention")


@pytest.mark.parametrize("family, subjects, typed, want", [
    ("toy", 1, 0, 800),
    ("toy", 2, 0, 1600),
    ("toy_xl", 1, 0, 800),
    ("sd15", 1, 0, 400),
    ("sdxl", 3, 0, 1200),
    ("zimage", 1, 0, 400),
    ("toy_zimage", 1, 0, 800),
    ("toy", 2, 300, 300),  # a typed number is the whole run's
])
def test_auto_steps_are_the_familys_per_subject(family, subjects, typed, want):
    """DreamBooth's steps 0 = auto: the family's steps per subject times the subjects (kohya's repeats work the same
    way), so a subject trained beside another is drawn as often as alone."""
    from comfyui_finetune.trainers.loop.session import resolve_auto

    got, extra = resolve_auto(DreamBoothRecipe(steps=typed), _Model(family), None, subjects)
    assert got.steps == want
    why = extra.get("chosen", {}).get("steps")
    assert (why is None) == bool(typed)
    if why:
        assert why.startswith("auto: ") and FAMILIES[family].label in why
        assert (f"x {subjects} subjects" in why) == (subjects > 1)


@pytest.mark.parametrize("family, recipe, want", [
    ("toy_zimage", DreamBoothRecipe(), 4),
    ("toy_zimage", DreamBoothRecipe(mode="full"), 1),
    ("toy", DreamBoothRecipe(), 1),
    ("zimage", DreamBoothRecipe(), 1),
    ("toy_zimage", DreamBoothRecipe(batch_size=2), 2),  # a typed batch is kept
])
def test_dreambooths_auto_batch_is_the_familys(family, recipe, want):
    """DreamBooth's batch_size 0 = auto: the family's (the toy Z-Image's 4 in lora mode: at a batch of 1 three of its
    subjects were drawn as often as their class), said in config.json's 'chosen'; the tooltip names it."""
    from comfyui_finetune.trainers.loop.session import resolve_auto

    got, extra = resolve_auto(recipe, _Model(family), None)
    assert got.batch_size == want
    assert ("batch_size" in extra.get("chosen", {})) == (recipe.batch_size == 0)
    assert DreamBoothRecipe().batch_size == 0
    assert "0 = auto: 4 on the toy Z-Image" in DreamBoothRecipe.options()["batch_size"].metadata["help"]


def test_the_steps_tooltip_says_what_auto_picks():
    from comfyui_finetune.trainers.loop.session import resolve_auto

    help_text = DreamBoothRecipe.options()["steps"].metadata["help"]
    assert "0 = auto" in help_text and DreamBoothRecipe().steps == 0
    for fam in ("toy", "toy_xl", "sd15", "sdxl", "zimage"):
        each = resolve_auto(DreamBoothRecipe(), _Model(fam), None)[0].steps
        assert re.search(rf"\b{each}\b", help_text), (fam, each, help_text)


def test_a_dreambooth_run_says_the_steps_auto_chose(toy, folders, caplog, monkeypatch):
    """Through the node: the log line, config.json's recipe and 'chosen', and the steps trained (the toy's steps per
    subject set to 2 here, so the run is short)."""
    from dataclasses import replace

    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_DreamBoothSubject, FT_TrainDreamBooth

    monkeypatch.setitem(FAMILIES, "toy", replace(FAMILIES["toy"], train_steps=(("dreambooth", 2),)))
    short = toy.share()
    short.family = FAMILIES["toy"]
    chain = None
    for color, shape, ident in (("purple", "star", "sks"), ("yellow", "circle", "zwx")):
        ds = FT_ToyDataset().execute(color, shape, 2, "x", 0, "narrow")[0]
        chain = FT_DreamBoothSubject().execute(ds, f"a {ident} {shape}", f"a {shape}", previous=chain)[0]
    with caplog.at_level(logging.INFO):
        _, _, log, _ = FT_TrainDreamBooth().execute(short, None, subjects=chain, prior_preservation=False,
                                                    batch_size=2, run_name="auto-steps")
    assert log.steps == 4
    assert any("steps 4 (auto: " in r.getMessage() and "x 2 subjects" in r.getMessage() for r in caplog.records)
    config = json.loads((folders["output"] / "finetune" / log.run / "config.json").read_text())
    assert config["recipe"]["steps"] == 4 and config["chosen"]["steps"].startswith("auto: ")


# ------------------------------------------------------------------------------------------------ guidance --
def test_the_sample_nodes_cfg_0_draws_at_the_familys_guidance(toy_xl):
    """cfg 0 (auto, the node's default) draws what the family's own guidance draws, at the same seeds: on the toy
    SDXL 2, not the 4 the node had before."""
    import torch

    from comfyui_finetune.nodes.sample import FT_Sample
    from comfyui_finetune.trainers.sampling import sample

    assert FT_Sample.INPUT_TYPES()["required"]["cfg"][1]["default"] == 0
    assert toy_xl.family.sample_cfg == 2.0
    auto_ = FT_Sample().execute(toy_xl, "a red square", "", 3, 4, 0.0, "auto", 0, 0, 2)[0]
    own = sample(toy_xl, "a red square", seeds=[3, 4], steps=4, cfg=2.0)
    four = sample(toy_xl, "a red square", seeds=[3, 4], steps=4, cfg=4.0)
    assert torch.equal(auto_, own) and (auto_ - four).abs().max() > 0.05


def test_the_cfg_tooltips_say_what_auto_picks():
    from comfyui_finetune.nodes.sample import FT_Sample

    tip = FT_Sample.INPUT_TYPES()["required"]["cfg"][1]["tooltip"]
    help_text = LoRARecipe.options()["validation_cfg"].metadata["help"]
    assert "0 = auto" in tip and "0 = auto" in help_text
    for fam in FAMILIES.values():
        assert re.search(rf"(?<![\d.]){fam.sample_cfg:g}(?![\d.])", tip), (fam.name, fam.sample_cfg, tip)
    assert re.search(r"1 for Z-Image Turbo", tip), tip  # the one model whose own guidance is not its family's
    for fam in ("toy", "toy_xl", "sd15"):
        assert re.search(rf"(?<![\d.]){FAMILIES[fam].sample_cfg:g}(?![\d.])", help_text), (fam, help_text)


@pytest.mark.parametrize("family, typed, want", [("toy_xl", 0.0, 2.0), ("toy", 0.0, 2.0), ("toy_audio", 0.0, 4.0),
                                                 ("sd15", 0.0, 7.5), ("sdxl", 0.0, 5.0), ("toy", 3.0, 3.0)])
def test_validation_cfg_auto_is_the_familys_and_said(family, typed, want):
    from comfyui_finetune.trainers.loop.session import resolve_auto

    got, extra = resolve_auto(LoRARecipe(validation_cfg=typed), _Model(family), None)
    assert got.validation_cfg == want
    assert ("validation_cfg" in extra.get("chosen", {})) == (typed == 0)
