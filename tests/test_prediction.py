"""What a model predicts (epsilon or v) is the family registry's to detect, the loader's to show and override, and a
run's to keep: an SD 2.x base model (512 px, epsilon) is no longer read as the 768 px v-prediction model."""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.nodes.models import PREDICTION, FT_LoadBaseModel, load_base_model
from comfyui_finetune.trainers.objectives import ddpm as diffusion
from comfyui_finetune.trainers.families import registry as families
from comfyui_finetune.trainers.model import loading


def sd2_state(spread: float, in_channels: int = 4) -> dict:
    torch.manual_seed(0)
    return {families.SD2_MARKER: torch.randn(320) * spread,
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3)}


def test_sd2_prediction_is_told_from_the_weights_as_comfyui_tells_it():
    assert families.sd2_prediction(sd2_state(0.3)) == "v_prediction"  # the 768 px v models' wide spread
    assert families.sd2_prediction(sd2_state(0.02)) == "epsilon"  # the 512 px base models' narrow one
    assert families.sd2_prediction(sd2_state(0.3, in_channels=9)) == "epsilon"  # inpainting models
    assert families.sd2_prediction({}) == "epsilon"
    sd2 = families.FAMILIES["sd2"]
    assert sd2.size_for("epsilon") == 512 and sd2.size_for("v_prediction") == 768
    assert families.FAMILIES["sd15"].detect(sd2_state(0.3)) == "epsilon"
    assert PREDICTION == ["auto", *families.PREDICTIONS]


def test_set_prediction_changes_target_size_and_description(toy):
    assert toy.prediction_type == "v_prediction"  # the toy was trained so (its shipped scheduler config)
    model = toy.share()
    before = toy.native_size
    loading.set_prediction(model, "epsilon", 2 * before, "set by the prediction input")
    assert model.prediction_type == "epsilon" and model.native_size == 2 * before
    assert toy.prediction_type == "v_prediction" and toy.native_size == before  # the shared base is not changed
    assert "epsilon (set by the prediction input)" in model.describe()
    assert model.identity()["prediction_type"] == "epsilon"
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(model.scheduler_config)
    x, noise, t = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.tensor([500])
    assert torch.equal(diffusion.target_for(sched, x, noise, t), noise)  # the loop now trains toward the noise
    sched = DDPMScheduler.from_config(toy.scheduler_config)
    assert not torch.allclose(diffusion.target_for(sched, x, noise, t), noise)  # the toy's own: the velocity
    with pytest.raises(ValueError, match="prediction 'x0'"):
        loading.set_prediction(model, "x0")


def test_loader_node_shows_what_it_loaded_and_refuses_a_wrong_toy_prediction(folders):
    out = FT_LoadBaseModel().load("toy (built-in)")
    assert out["ui"]["text"][0].startswith("toy: built-in toy model") and "32 px, v_prediction" in out["ui"]["text"][0]
    assert load_base_model("toy (built-in)", prediction="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="toy model was trained to predict v_prediction"):
        load_base_model("toy (built-in)", prediction="epsilon")
    with pytest.raises(ValueError, match="prediction 'sample' is not one of auto, epsilon, v_prediction"):
        load_base_model("toy (built-in)", prediction="sample")


def test_a_run_does_not_resume_with_another_prediction_type(toy, folders):
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    ds = FT_ToyDataset().execute("purple", "star", 4, "a sks star", 0, "narrow")[0]
    args = dict(learning_rate=1e-3, batch_size=2, rank=4, alpha=4.0, seed=0, target_modules="attention",
                train_text_encoder=False, text_encoder_lr=0.0, run_name="pred")
    log = FT_TrainLoRA().execute(toy, ds, steps=2, **args)[2]
    assert log.config["model"]["prediction_type"] == "v_prediction"
    other = toy.share()
    loading.set_prediction(other, "epsilon")
    with pytest.raises(ValueError, match="the run trained v_prediction, this model predicts epsilon"):
        FT_TrainLoRA().execute(other, ds, steps=4, resume_run=log.run, **args)
