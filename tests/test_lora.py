"""LoRA end to end on the toy world: it learns, resumes exactly, saves files other tools read, rejects nonsense."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes import host
from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.nodes.evaluate import FT_LossPlot
from comfyui_finetune.nodes.io import FT_ApplyLoRA, FT_SaveLoRA
from comfyui_finetune.nodes.train import FT_TrainLoRA
from comfyui_finetune.trainers.sampling import sample

SEEDS = list(range(1000, 1016))


def toy_set(color="purple", shape="star", n=8, caption="a sks star", **opt):
    return FT_ToyDataset().execute(color, shape, n, caption, 0, "narrow", **opt)[0]


def train(model, dataset, **kw):
    args = dict(steps=200, learning_rate=1e-3, batch_size=4, rank=8, alpha=8.0, seed=0,
                target_modules="attention+feedforward", train_text_encoder=False, text_encoder_lr=0.0,
                run_name="test", snr_gamma=5.0)
    args.update(kw)
    return FT_TrainLoRA().execute(model, dataset, **args)


def rate(model, judge, prompt, color, shape, seeds=SEEDS):
    with torch.inference_mode(False):
        res = judge.judge(sample(model, prompt, seeds=seeds, steps=20, cfg=4.0))
    return float(np.mean([r["color"] == color and r["shape"] == shape for r in res]))


def weights_sum(model):
    return sum(float(p.double().sum()) for p in model.unet.parameters())


@pytest.mark.slow
def test_lora_teaches_a_new_concept_and_leaves_others_alone(toy, judge, folders):
    before = weights_sum(toy)
    base = rate(toy, judge, "a sks star", "purple", "star")
    tuned, lora, log = train(toy, toy_set())
    after = rate(tuned, judge, "a sks star", "purple", "star")
    print(f"'a sks star' shown as a purple star: base {base:.2f}, after LoRA {after:.2f}")
    assert base <= 0.1
    assert after >= 0.8
    assert weights_sum(toy) == before, "training must not change the input model"
    # an unrelated prompt keeps its look
    with torch.inference_mode(False):
        a = sample(toy, "a red circle", seeds=SEEDS[:8], steps=20)
        b = sample(tuned, "a red circle", seeds=SEEDS[:8], steps=20)
    assert rate(tuned, judge, "a red circle", "red", "circle", SEEDS[:8]) >= 0.8
    assert float((a - b).abs().mean()) < 0.08
    assert log.steps == 200 and len(log.losses()) == 200
    run = folders["output"] / "finetune" / log.run
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "checkpoints" / "step-200" / "manifest.json").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 200
    plot = FT_LossPlot().execute(log, 512, 256)[0]
    assert plot.shape == (1, 256, 512, 3)


def test_cancel_keeps_a_checkpoint_and_resume_is_bit_exact(toy, folders, monkeypatch, press_cancel_at):
    ds = toy_set(n=4)
    kw = dict(steps=6, batch_size=2, train_text_encoder=True, save_every=0)
    _, straight, _ = train(toy, ds, run_name="straight", **kw)

    press_cancel_at(3)
    with pytest.raises(host.Interrupted, match="cancelled at step 3; resume with resume_run='stopped'"):
        train(toy, ds, run_name="stopped", **kw)
    monkeypatch.undo()
    assert not host.interrupted()
    run = folders["output"] / "finetune" / "stopped"
    assert json.loads((run / "status.json").read_text())["status"] == "cancelled"
    assert (run / "checkpoints" / "step-3" / "manifest.json").is_file()
    _, resumed, log = train(toy, ds, run_name="ignored", resume_run="stopped", **kw)
    assert log.resumed_from == 3 and log.steps == 6 and len(log.rows) == 6
    assert resumed.state.keys() == straight.state.keys()
    for k in straight.state:
        assert torch.equal(straight.state[k], resumed.state[k]), k


def test_interrupt_raised_by_a_progress_callback_still_checkpoints(toy, folders, monkeypatch):
    """Inside ComfyUI the progress bar itself raises ComfyUI's InterruptProcessingException on Cancel: nodes/host.py
    turns it into the library's Interrupted, so the loop keeps the step that finished and marks the run cancelled;
    at the node's edge ComfyUI gets its own exception back."""
    import sys
    import types

    from comfyui_finetune.trainers.loop.training import Callbacks, Interrupted, train as loop_train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir
    from comfyui_finetune.trainers.methods.lora import LoRAMethod

    class InterruptProcessingException(Exception):  # ComfyUI's, raised by its progress bar's hook on Cancel
        pass

    class ProgressBar:  # comfy.utils.ProgressBar, with Cancel pressed as step 2 ends
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            if value == 2:
                raise InterruptProcessingException()

    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.InterruptProcessingException = InterruptProcessingException
    for name, module in (("comfy", comfy), ("comfy.utils", comfy.utils),
                         ("comfy.model_management", comfy.model_management),
                         ("folder_paths", types.ModuleType("folder_paths"))):
        monkeypatch.setitem(sys.modules, name, module)
    assert host.in_comfyui()
    bar = host.Progress(5)

    run = RunDir.create(folders["output"], "raised")
    with pytest.raises(InterruptProcessingException) as raised, host.cancels_for_comfyui():
        loop_train(toy.clone(), toy_set(n=4), LoRAMethod(4, 4.0), TrainConfig(steps=5, batch_size=2), run,
                   Callbacks(on_step=lambda info: bar.update(info.step)))
    assert isinstance(raised.value.__cause__, Interrupted)
    assert [s for s, _ in run.checkpoints()] == [2]
    assert json.loads((run.path / "status.json").read_text())["status"] == "cancelled"


def test_saved_file_is_kohya_and_loads_in_diffusers_with_the_same_images(toy, folders):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from comfyui_finetune.trainers.toy.loader import WEIGHTS

    _, lora, _ = train(toy, toy_set(), steps=30, train_text_encoder=True,
                       target_modules="attention+feedforward+conv")
    (name,) = FT_SaveLoRA().execute(lora, "sub/my_lora")["result"]
    (name2,) = FT_SaveLoRA().execute(lora, "sub/my_lora")["result"]
    assert name == "sub/my_lora.safetensors" and name2 == "sub/my_lora_00001.safetensors"  # never overwritten
    path = folders["models"] / "loras" / name
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0" and meta["ss_steps"] == "30"
    assert meta["ss_num_train_images"] == "8" and "sks star" in meta["ss_tag_frequency"]
    assert json.loads(meta["finetune_config"])["recipe"]["rank"] == 8
    assert not list(path.parent.glob("*.tmp"))

    (ours,) = FT_ApplyLoRA().execute(toy, name, 1.0)
    with torch.inference_mode(False):
        mine = sample(ours, "a sks star", seeds=[1, 2, 3], steps=10)
    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS / "pipeline"), local_files_only=True)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()  # no "lora key not loaded": fusing fails loudly if modules were skipped
    from comfyui_finetune.trainers.model.model import FTModel

    theirs = FTModel("toy", "diffusers", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                     dict(toy.scheduler_config))
    with torch.inference_mode(False):
        ref = sample(theirs, "a sks star", seeds=[1, 2, 3], steps=10)
    with torch.inference_mode(False):
        base = sample(toy, "a sks star", seeds=[1, 2, 3], steps=10)
    assert float((mine - base).abs().max()) > 0.05, "the LoRA should change the picture"
    diff = float((mine - ref).abs().max())
    print(f"max pixel difference, pack apply vs diffusers load_lora_weights: {diff:.2e}")
    assert diff < 2e-3
    # strength 0 changes nothing
    (zero,) = FT_ApplyLoRA().execute(toy, name, 0.0)
    from comfyui_finetune.trainers.model.deltas import plain_state_dict

    merged, own = plain_state_dict(zero.unet), toy.unet.state_dict()
    assert merged.keys() == own.keys() and all(torch.equal(merged[k], own[k]) for k in own)


def test_bad_settings_are_clear_errors(toy, folders):
    ds = toy_set(n=3)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        train(toy, ds, rank=0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        train(toy, ds, steps=0)
    with pytest.raises(ValueError, match="batch_size 4 is larger than the dataset \\(3 pictures"):
        train(toy, ds, batch_size=4)
    with pytest.raises(FileNotFoundError, match="resume_run 'nope' is not a run folder"):
        train(toy, ds, resume_run="nope")
    with pytest.raises(ValueError, match="no LoRA given"):
        FT_ApplyLoRA().execute(toy, "none", 1.0)
    bad = folders["models"] / "loras" / "other.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    with pytest.raises(ValueError, match="does not fit this toy model"):
        FT_ApplyLoRA().execute(toy, "other.safetensors", 1.0)


def test_gradient_checkpointing_and_accumulation_train_the_same(toy, folders):
    """Checkpointing trades memory for compute and must not change the result; accumulation runs."""
    ds = toy_set(n=4)
    _, plain, log_a = train(toy, ds, steps=3, batch_size=2, run_name="plain")
    _, ckpt, log_b = train(toy, ds, steps=3, batch_size=2, run_name="ckpt", gradient_checkpointing="on")
    assert all(torch.allclose(plain.state[k], ckpt.state[k], atol=1e-5) for k in plain.state)
    assert log_a.losses() == pytest.approx(log_b.losses(), rel=1e-4)
    _, _, log_c = train(toy, ds, steps=2, batch_size=2, run_name="accum", grad_accum=2, lr_scheduler="cosine",
                        warmup_steps=1, optimizer="adam", loss="huber", noise_offset=0.05)
    assert len(log_c.rows) == 2 and all(np.isfinite(log_c.losses()))
