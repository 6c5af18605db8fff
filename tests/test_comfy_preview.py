"""Who draws validation pictures (nodes/comfy_preview.py), without ComfyUI: the pack's sampler outside it (the log
says why), what each method hands over, the trained word as ComfyUI writes it, and the loop's drawing seam (a
drawer's pictures are the run's samples and keep_best's). ComfyUI's own drawing is judged in
test_comfyui_bridges.py (preview == LoraLoader + KSampler + VAE Decode)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_finetune.nodes import comfy_preview
from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.trainers.config.recipes import (COMFY_SAMPLER_NAMES, COMFY_SCHEDULERS, LoRARecipe,
                                                       TextualInversionRecipe)


def test_outside_comfyui_the_pack_draws_and_says_why(toy, caplog):
    recipe = LoRARecipe(validation_prompt="a sks star", validation_every=10, validation_sampler="comfyui")
    with caplog.at_level(logging.INFO):
        assert comfy_preview.drawer(toy, recipe) is None
    assert "the pack's sampler (DDIM, 20 steps, cfg 2, seeds 0..1), not ComfyUI's: outside ComfyUI" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert comfy_preview.drawer(toy, LoRARecipe(validation_prompt="x", validation_every=5,
                                                    validation_sampler="pack")) is None
    assert "as validation_sampler asks" in caplog.text
    assert comfy_preview.drawer(toy, LoRARecipe()) is None  # no validation: nothing to draw, nothing said


def test_choices_are_ksamplers_and_the_defaults():
    r = TextualInversionRecipe()
    assert (r.validation_sampler, r.validation_steps, r.validation_cfg) == ("auto", 20, 0.0)  # cfg: auto
    assert {"euler", "dpmpp_2m", "ddim", "uni_pc"} <= set(COMFY_SAMPLER_NAMES)
    assert {"normal", "karras", "simple"} <= set(COMFY_SCHEDULERS)
    with pytest.raises(ValueError, match="validation_scheduler"):
        LoRARecipe(validation_scheduler="sometimes").check()


def test_each_method_hands_comfyui_what_its_save_node_writes():
    from comfyui_finetune.trainers.methods.dreambooth import DreamBoothMethod, FullMethod, PivotalMethod
    from comfyui_finetune.trainers.methods.lora import LoRAMethod
    from comfyui_finetune.trainers.methods.textual_inversion import TextualInversionMethod

    lora, ti = LoRAMethod(rank=4), TextualInversionMethod("<x>", "object")
    assert comfy_preview.pieces(lora) == {"lora": lora}
    assert comfy_preview.pieces(ti) == {"ti": ti}
    assert comfy_preview.pieces(DreamBoothMethod("lora", lora)) == {"lora": lora}
    assert comfy_preview.pieces(DreamBoothMethod("full", FullMethod())) == {"full": True}
    assert comfy_preview.pieces(PivotalMethod(lora, ti, 0.0)) == {"lora": lora, "ti": ti}
    from comfyui_finetune.trainers.methods.controlnet import ControlNetMethod

    cn = ControlNetMethod("canny")
    assert comfy_preview.pieces(cn) == {"controlnet": cn}
    assert comfy_preview.pieces(object()) is None


def test_the_trained_word_becomes_embedding_name():
    to = comfy_preview.embedding_prompt
    assert to("a photo of <ft-thing>, sharp", "<ft-thing>") == "a photo of embedding:ft_preview, sharp"
    assert to("a sks dog, sksx sks", "sks") == "a embedding:ft_preview dog, sksx embedding:ft_preview"


def test_a_drawer_draws_the_runs_samples(toy, tmp_path):
    """The loop's seam: with callbacks.draw set, the pictures it returns are the run's validation pictures (seeds
    seed, seed + 1 at the validation size), and the pack's sampler is not called."""
    from comfyui_finetune.trainers.loop.training import Callbacks
    from comfyui_finetune.trainers.methods.lora import LoRAMethod, train_lora
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    calls = []

    def draw(model, method, seeds, width, height):
        calls.append((type(method).__name__, seeds, width, height))
        return torch.full((len(seeds), height, width, 3), 0.5)

    recipe = LoRARecipe(steps=2, learning_rate=1e-3, seed=7, rank=4, validation_prompt="a sks star",
                        validation_every=2, validation_images=2, run_name="drawn")
    ds = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0]
    shown = []
    with torch.inference_mode(False):
        train_lora(recipe, toy, ds, RunDir.create(tmp_path, "drawn"),
                   Callbacks(draw=draw, on_preview=lambda step, imgs: shown.append((step, imgs))))
    assert calls == [("LoRAMethod", [7, 8], toy.native_size, toy.native_size)]
    assert [s for s, _ in shown] == [2] and torch.equal(shown[0][1], torch.full_like(shown[0][1], 0.5))
    png = np.asarray(Image.open(tmp_path / "drawn" / "samples" / "step-2-1.png"))
    assert png.shape == (toy.native_size, toy.native_size, 3) and abs(png.astype(int) - 128).max() <= 1
    assert isinstance(comfy_preview.pieces(LoRAMethod()), dict)
