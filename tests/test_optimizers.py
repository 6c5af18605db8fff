"""Every optimizer a recipe can name: it lowers the loss on a fixed batch, a run with it resumes exactly (8-bit: within
its rounding), a missing optional package is an error naming the pip install, and impossible combinations are
refused before any work."""
from __future__ import annotations

import sys

import pytest
import torch

from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.trainers.loop import optimizers
from comfyui_finetune.trainers.config.recipes import LoRARecipe
from comfyui_finetune.trainers.runs.run_dir import RunDir

#: a learning rate each optimizer trains the toy LoRA with
LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-1, "rmsprop": 1e-4, "prodigy": 1.0, "adafactor": 1e-3,
      "adamw8bit": 1e-3, "schedulefree_adamw": 1e-3, "lion": 1e-4}
#: steps on the fixed batch: Prodigy starts from a tiny step size (d0 = 1e-6) and grows it as it learns the scale
STEPS = {"prodigy": 100}
NEEDS = {name: spec.package for name, spec in optimizers.OPTIMIZERS.items() if spec.package}


def test_every_optimizer_has_a_learning_rate_here():
    assert set(LR) == set(optimizers.OPTIMIZERS)


def installed(name: str) -> None:
    if NEEDS.get(name):
        pytest.importorskip(NEEDS[name], reason=f"{NEEDS[name]} is not installed (pip install "
                                                 f"\"comfyui-finetune[optimizers]\")")


def toy_set(n=2):
    return FT_ToyDataset().execute("purple", "star", n, "a sks star", 0, "narrow")[0]


@pytest.mark.parametrize("name", list(LR))
def test_each_optimizer_lowers_the_loss_on_a_fixed_batch(toy, name):
    from comfyui_finetune.trainers.loop.batches import encode_latent_dists
    from comfyui_finetune.trainers.data.dataset import prepare
    from comfyui_finetune.trainers.methods.lora import LoRAMethod

    installed(name)
    model = toy.share()
    method = LoRAMethod(4, 4.0, "attention+feedforward")
    cfg = LoRARecipe(optimizer=name, learning_rate=LR[name], weight_decay=0.0)
    with torch.inference_mode(False):
        torch.manual_seed(0)
        method.setup(model)
        groups = method.param_groups(cfg)
        opt, _ = optimizers.make(groups, cfg)
        optimizers.for_training(opt)
        px = next(iter(prepare(toy_set(), model.native_size, 8).pixels.values()))
        mean, _ = encode_latent_dists(model, {"b": px})["b"]
        g = torch.Generator().manual_seed(0)
        latents = mean * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.tensor([300, 700])
        noisy = _noisy(model, latents, noise, t)
        ctx = model.encode_prompts(["a sks star"] * 2).detach()

        def loss():
            return torch.nn.functional.mse_loss(model.unet(noisy, t, ctx).sample, noise)

        first = float(loss())
        for _ in range(STEPS.get(name, 8)):
            opt.zero_grad()
            loss().backward()
            opt.step()
        optimizers.finish(opt)
        with torch.no_grad():
            last = float(loss())
    print(f"{name}: loss {first:.4f} -> {last:.4f}")
    assert last < first * 0.995, f"{name} did not lower the loss: {first:.5f} -> {last:.5f}"


def _noisy(model, latents, noise, t):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(model.scheduler_config).add_noise(latents, noise, t)


def lora_run(toy, tmp_path, name, run, **kw):
    from comfyui_finetune.trainers.methods.lora import train_lora

    args = dict(steps=4, batch_size=2, learning_rate=LR[name], seed=0, optimizer=name, rank=4)
    args.update(kw)
    path = tmp_path / run
    with torch.inference_mode(False):
        return train_lora(LoRARecipe(**args), toy, toy_set(4), RunDir(path) if path.exists() else
                          RunDir.create(tmp_path, run))


@pytest.mark.parametrize("name", list(LR))
def test_a_run_with_each_optimizer_resumes_where_it_stopped(toy, tmp_path, name):
    installed(name)
    whole = lora_run(toy, tmp_path, name, "whole")
    lora_run(toy, tmp_path, name, "half", steps=2, save_every=1)
    resumed = lora_run(toy, tmp_path, name, "half", resume_run="half")
    assert resumed.resumed_from == 2
    a, b = whole.result.state, resumed.result.state
    assert a.keys() == b.keys()
    for k in a:
        if name == "adamw8bit":  # its states are quantized: a reload may round once more
            assert torch.allclose(a[k], b[k], atol=1e-5), k
        else:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after a resume"


def test_schedule_free_validation_never_changes_the_run_and_the_result_is_averaged(toy, tmp_path):
    installed("schedulefree_adamw")
    plain = lora_run(toy, tmp_path, "schedulefree_adamw", "plain")
    checked = lora_run(toy, tmp_path, "schedulefree_adamw", "checked", validation_prompt="a sks star",
                       validation_every=1, validation_images=1)
    assert all(torch.equal(plain.result.state[k], checked.result.state[k]) for k in plain.result.state)
    # the result is the averaged weights, not the training ones the checkpoint holds
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "plain" / "checkpoints" / "step-4" / "trainable.safetensors"))
    ups = [k for k in ckpt if "lora_B" in k]
    assert ups and any(not torch.equal(ckpt[k], _kohya(plain.result, k)) for k in ups)


def _kohya(lora, peft_key: str) -> torch.Tensor:
    from comfyui_finetune.trainers.methods.lora import kohya_key

    part, rest = peft_key.split(".", 1)
    return lora.state[f"{kohya_key(part, rest.split('.lora_B.')[0])}.lora_up.weight"]


def test_adafactor_with_its_own_schedule_trains(toy, tmp_path):
    t = lora_run(toy, tmp_path, "adafactor", "ada", lr_scheduler="adafactor", steps=6)
    lrs = [r["lr"] for r in t.log]
    # relative step with warm-up init: the step size grows from 0 with the step count (kohya's "adafactor" schedule)
    assert lrs[0] == 0.0 and all(b > a > 0 for a, b in zip(lrs[1:], lrs[2:])), lrs


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_a_missing_package_names_the_pip_install(toy, monkeypatch, name):
    monkeypatch.setitem(sys.modules, NEEDS[name], None)  # as if it were not installed
    cfg = LoRARecipe(optimizer=name, learning_rate=LR[name])
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ModuleNotFoundError, match=rf"optimizer '{name}' needs the {optimizers.OPTIMIZERS[name].pip} "
                                                  r"package, which is not installed: pip install "):
        optimizers.make([{"params": [p], "lr": cfg.learning_rate}], cfg)


@pytest.mark.parametrize("kw,message", [
    ({"lr_scheduler": "adafactor"}, "lr_scheduler 'adafactor' is Adafactor's own schedule; with optimizer 'adamw'"),
    ({"optimizer": "schedulefree_adamw", "lr_scheduler": "cosine"},
     "optimizer schedulefree_adamw schedules itself: set lr_scheduler to constant \\(got 'cosine'\\)"),
    ({"optimizer": "prodigy", "learning_rate": 1e-4}, "optimizer prodigy finds its own step size: learning_rate is a "
                                                      "multiplier of it, usually 1.0 \\(got 0.0001"),
])
def test_combinations_that_cannot_work_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        LoRARecipe(**kw)
