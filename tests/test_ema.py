"""The moving average of the trained weights: the formula, through the real loop; checkpointed and resumed exactly;
validation pictures use it without changing the run."""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.trainers.loop.ema import EMA, swapped_in
from comfyui_finetune.trainers.config.recipes import LoRARecipe
from comfyui_finetune.trainers.runs.run_dir import RunDir


def test_the_average_follows_the_formula():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, start=2, every=2)
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    want = None
    for step, v in enumerate(values, 1):
        with torch.no_grad():
            p.fill_(v)
        ema.update(step)
        if step <= 2:
            want = v  # before the start it follows the weights
        elif (step - 2) % 2 == 0:
            want = 0.5 * want + 0.5 * v
        assert torch.equal(ema.shadow[0], torch.full((3,), want)), (step, ema.shadow[0], want)
    assert want == 0.5 * (0.5 * 2.0 + 0.5 * 8.0) + 0.5 * 32.0  # follows 1, 2; averages at steps 4 and 6
    with swapped_in(ema):
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.full((3,), 32.0))  # exactly back
    with pytest.raises(ValueError, match="ema_decay must be between 0 and 1"):
        EMA([p], decay=1.0)


def toy_set(n=4):
    return FT_ToyDataset().execute("purple", "star", n, "a sks star", 0, "narrow")[0]


def run(toy, tmp_path, name, **kw):
    from comfyui_finetune.trainers.methods.lora import train_lora

    args = dict(steps=6, batch_size=2, learning_rate=1e-2, seed=0, rank=4, ema_decay=0.8, ema_start=1, ema_every=2)
    args.update(kw)
    path = tmp_path / name
    with torch.inference_mode(False):
        return train_lora(LoRARecipe(**args), toy, toy_set(), RunDir(path) if path.exists()
                          else RunDir.create(tmp_path, name))


def kohya(lora, peft_key: str) -> torch.Tensor:
    from comfyui_finetune.trainers.methods.lora import kohya_key

    part, rest = peft_key.split(".", 1)
    kind = "lora_down" if ".lora_A." in rest else "lora_up"
    mod = rest.split(".lora_A.")[0] if kind == "lora_down" else rest.split(".lora_B.")[0]
    return lora.state[f"{kohya_key(part, mod)}.{kind}.weight"]


def test_the_result_is_the_average_of_the_steps_weights(toy, tmp_path):
    from safetensors.torch import load_file

    t = run(toy, tmp_path, "ema", save_every=1)
    folder = tmp_path / "ema" / "checkpoints"
    steps = [load_file(str(folder / f"step-{i}" / "trainable.safetensors")) for i in range(1, 7)]
    keys = list(steps[0])
    ref = {}
    for step, weights in enumerate(steps, 1):  # decay 0.8, start 1, every 2: follows step 1, averages at 3 and 5
        for k in keys:
            if step <= 1:
                ref[k] = weights[k].clone()
            elif (step - 1) % 2 == 0:
                ref[k] = 0.8 * ref[k] + 0.2 * weights[k]
    for k in keys:
        assert torch.allclose(kohya(t.result, k), ref[k], atol=1e-7), k
    assert any(not torch.allclose(kohya(t.result, k), steps[-1][k]) for k in keys), "the result is not the last step"


def test_a_run_with_an_average_resumes_exactly_and_validation_does_not_change_it(toy, tmp_path):
    whole = run(toy, tmp_path, "whole", validation_prompt="a sks star", validation_every=1, validation_images=1)
    plain = run(toy, tmp_path, "plain")
    run(toy, tmp_path, "half", steps=3, save_every=1)
    resumed = run(toy, tmp_path, "half", resume_run="half")
    assert resumed.resumed_from == 3
    for k in whole.result.state:
        assert torch.equal(whole.result.state[k], plain.result.state[k]), f"validation changed {k}"
        assert torch.equal(whole.result.state[k], resumed.result.state[k]), f"resume changed {k}"
    assert (tmp_path / "whole" / "samples" / "step-6-0.png").is_file()


def test_resuming_a_run_without_an_average_with_one_is_refused(toy, tmp_path):
    run(toy, tmp_path, "noema", steps=2, ema_decay=0.0)
    with pytest.raises(ValueError, match="resume_run 'noema' was trained without ema_decay: resume it with "
                                         "ema_decay 0, or start a new run"):
        run(toy, tmp_path, "noema", steps=4, resume_run="noema")
