"""The GPU path: one training step per method under bf16 and fp16 (on the toy and the toy SDXL), a resume, a
ControlNet in fp16, and ComfyUI's memory hand-off. The GPU cases are marked ``cuda`` and skipped, with the reason,
where torch sees no CUDA GPU; on a GPU machine run ``python -m pytest -m cuda`` (``benchmarks/gpu_check.sh`` runs
them with the benchmark).

The bf16 cases also run on the CPU everywhere: half-precision frozen weights with fp32 trainable ones take the same
code there (autocast, the dtype a trained part goes back to), so a CPU machine catches most of what breaks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.trainers.config.recipes import ControlNetRecipe, DreamBoothRecipe, LoRARecipe, TextualInversionRecipe
from comfyui_finetune.trainers.runs.run_dir import RunDir

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def on_gpu(precision: str):
    return pytest.param("cuda", precision, marks=[pytest.mark.cuda, NO_GPU], id=f"cuda-{precision}")


CASES = [on_gpu("bf16"), on_gpu("fp16"), pytest.param("cpu", "bf16", id="cpu-bf16")]


def gpu_model(toy, device: str, precision: str):
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    return toy.share().to(device, DTYPES[precision])


def toy_set(color="purple", shape="star", n=4, caption="a <sks> star"):
    return FT_ToyDataset().execute(color, shape, n, caption, 0, "narrow")[0]


def recipe(cls, precision, **kw):
    base = dict(steps=2, batch_size=2, learning_rate=1e-3, seed=0, mixed_precision=precision,
                validation_prompt="a <sks> star", validation_every=2, validation_images=1)
    base.update(kw)
    return cls(**base)


def finite(trained) -> bool:
    return all(torch.isfinite(torch.tensor(r["loss"])) for r in trained.log) and len(trained.log) > 0


def draws(model) -> torch.Tensor:
    from comfyui_finetune.trainers.sampling import sample

    with torch.inference_mode(False):
        img = sample(model, "a <sks> star", seeds=[0], steps=3)
    assert torch.isfinite(img).all() and img.shape == (1, 32, 32, 3)
    return img


@pytest.mark.parametrize("device,precision", CASES)
@pytest.mark.parametrize("case", ["lora", "lora+te", "ti", "dreambooth-lora", "dreambooth-full", "pivotal",
                                  "controlnet"])
@pytest.mark.parametrize("family", ["toy", "toy_xl"])  # toy_xl: two encoders, the pooled embedding, time ids
def test_one_step_of_every_method(request, tmp_path, family, case, device, precision):
    model = gpu_model(request.getfixturevalue(family), device, precision)
    dt = DTYPES[precision]
    run = RunDir.create(tmp_path, case)
    with torch.inference_mode(False):
        if case.startswith("lora"):
            from comfyui_finetune.trainers.methods.lora import train_lora

            t = train_lora(recipe(LoRARecipe, precision, train_text_encoder=case == "lora+te",
                                  gradient_checkpointing="on", channels_last=True), model, toy_set(), run)
            assert all(v.dtype == torch.float32 for v in t.result.state.values())  # the LoRA trained in fp32
        elif case == "ti":
            from comfyui_finetune.trainers.methods.textual_inversion import train_textual_inversion

            t = train_textual_inversion(recipe(TextualInversionRecipe, precision, token="<sks>", init_token="star",
                                               caption_mode="object templates"), model, toy_set(), run)
            assert t.result.vectors.dtype == torch.float32
        elif case == "controlnet":
            from comfyui_finetune.trainers.methods.controlnet import train_controlnet

            t = train_controlnet(recipe(ControlNetRecipe, precision, low_threshold=0.1, high_threshold=0.2,
                                        validation_prompt="a star"), model, toy_set(), run)
        else:
            from comfyui_finetune.trainers.methods.dreambooth import Subject, train_dreambooth

            subject = Subject(toy_set(), "a <sks> star", "a star", toy_set(color="yellow", caption="a star"))
            mode = "full" if case == "dreambooth-full" else "lora"
            t = train_dreambooth(recipe(DreamBoothRecipe, precision, mode=mode, pivotal_tuning=case == "pivotal",
                                        num_class_images=4, instance_prompt="a <sks> star", class_prompt="a star",
                                        gradient_checkpointing="on"), model, [subject], run)
    assert finite(t)
    assert (run.path / "samples" / "step-2-0.png").is_file()  # validation sampled mid-training
    assert t.model.dtype == dt
    for name, part in t.model.parts().items():  # each in the model's precision (SDXL's VAE: fp32 beside fp16)
        assert {p.dtype for p in part.parameters()} == {t.model.part_dtype(name)}, \
            "the trained model is back in the model's precision"
        assert all(p.device.type == device for p in part.parameters())
    if case != "controlnet":
        draws(t.model)


@pytest.mark.parametrize("device,precision", CASES)
def test_a_resumed_run_continues_where_it_stopped(toy, tmp_path, device, precision):
    from comfyui_finetune.trainers.methods.lora import train_lora

    model = gpu_model(toy, device, precision)
    with torch.inference_mode(False):
        whole = train_lora(recipe(LoRARecipe, precision, steps=4, validation_every=0), model, toy_set(),
                           RunDir.create(tmp_path, "whole"))
        half = RunDir.create(tmp_path, "half")
        train_lora(recipe(LoRARecipe, precision, steps=2, save_every=1, validation_every=0), model, toy_set(), half)
        resumed = train_lora(recipe(LoRARecipe, precision, steps=4, resume_run="half", validation_every=0), model,
                             toy_set(), RunDir(half.path))
    assert resumed.resumed_from == 2 and resumed.step == 4
    a = torch.cat([v.flatten() for v in whole.result.state.values()])
    b = torch.cat([v.flatten() for v in resumed.result.state.values()])
    # the same data, noise and timesteps: a GPU's kernels may round differently, so close rather than bit-exact
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), float((a - b).abs().max())
    if precision == "fp16":
        st = json.loads((half.path / "config.json").read_text())
        assert st["recipe"]["mixed_precision"] == "fp16"


@pytest.mark.parametrize("device,precision", [on_gpu("fp16"), pytest.param("cpu", "bf16", id="cpu-bf16")])
def test_a_controlnet_in_half_precision_follows_its_condition(toy, device, precision):
    from comfyui_finetune.trainers.adapters.controlnet.apply import Control
    from comfyui_finetune.trainers.sampling import sample
    from comfyui_finetune.trainers.toy.loader import load_toy_controlnet

    model = gpu_model(toy, device, precision)
    cn = load_toy_controlnet()
    cond = torch.zeros(1, 32, 32, 3)
    cond[:, 8:24, 8:24] = 1.0
    with torch.inference_mode(False):
        plain = sample(model, "a red circle", seeds=[0], steps=10)
        ruled = sample(model, "a red circle", seeds=[0], steps=10, controls=[Control(cn, cond, 1.0)])
    assert torch.isfinite(ruled).all()
    assert float((ruled - plain).abs().mean()) > 0.01, "the ControlNet should change the picture"


@pytest.mark.cuda
@NO_GPU
def test_an_offloaded_model_trains_on_the_gpu_and_leaves_nothing_there(tmp_path):
    import gc

    from comfyui_finetune.nodes.models import load_base_model
    from comfyui_finetune.trainers.methods.lora import train_lora

    model = load_base_model("toy", "cuda", "auto")  # offload auto: the weights wait in CPU memory
    assert model.offload and model.device.type == "cuda"
    assert all(p.device.type == "cpu" for part in (model.unet, model.vae, model.text_encoder)
               for p in part.parameters())
    gc.collect()
    torch.cuda.synchronize()
    idle = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(False):
        t = train_lora(recipe(LoRARecipe, "auto"), model, toy_set(), RunDir.create(tmp_path, "offloaded"))
    assert finite(t) and torch.cuda.max_memory_allocated() > idle  # it did train on the GPU
    draws(t.model)
    gc.collect()
    assert t.model.offload
    assert all(p.device.type == "cpu" for part in (t.model.unet, t.model.vae, t.model.text_encoder)
               for p in part.parameters())
    assert torch.cuda.memory_allocated() - idle < 2**20, "nothing of the run stays on the GPU"


def benchmark_models():
    """benchmarks/train_step.py: the architectures with random weights, the benchmark pictures."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_step

    return train_step


def lora_at_1024_px(model, pictures: int, recipe: LoRARecipe, tmp_path) -> tuple[float, float]:
    """Train LoRA's ``recipe`` at 1024 px on ``model`` (as its loader's auto leaves it: offloaded, for the
    GPU), then FT_Sample at 1024 px: the GB each held at most (``max_memory_allocated``)."""
    from comfyui_finetune.trainers.data.dataset import Dataset, Example
    from comfyui_finetune.trainers.methods.lora import train_lora
    from comfyui_finetune.trainers.sampling import sample

    train_step = benchmark_models()
    model.device, model.offload = torch.device("cuda"), True  # offload auto: the weights wait in CPU memory
    ds = Dataset([Example(p, "a photo of a sks thing", f"p{i}")
                  for i, p in enumerate(train_step.pictures(pictures, 1024))], resolution=1024)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(False):
        t = train_lora(recipe, model, ds, RunDir.create(tmp_path, model.family.name))
    trained = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    img = sample(t.model, "a photo of a sks thing", seeds=[0], steps=2, width=1024, height=1024)
    sampled = torch.cuda.max_memory_allocated() / 2**30
    assert finite(t) and torch.isfinite(img).all() and img.shape == (1, 1024, 1024, 3)
    return trained, sampled


@pytest.mark.cuda
@NO_GPU
def test_an_sdxl_lora_at_1024_px_trains_and_samples_in_10_gb(tmp_path):
    """Issue 19's target: FT_TrainLoRA's defaults on SDXL's architecture (random weights, ``configs/sdxl``) at
    1024 px, batch 1, 16 pictures, the model as FT_LoadBaseModel's auto leaves it (fp16 weights, the VAE in fp32,
    offloaded), then FT_Sample at 1024 px: each under 10 GB of GPU memory (``max_memory_allocated``).
    ``benchmarks/sdxl_memory.py`` counts the same stages on a CPU."""
    model = benchmark_models().sdxl_model(torch.float16, "cpu")
    trained, sampled = lora_at_1024_px(model, 16, LoRARecipe(steps=2, batch_size=1, seed=0), tmp_path)
    print(f"SDXL LoRA at 1024 px: training {trained:.2f} GB, sampling {sampled:.2f} GB (max_memory_allocated)")
    assert trained < 10 and sampled < 10


@pytest.mark.cuda
@NO_GPU
def test_a_zimage_lora_at_1024_px_trains_in_16_gb(tmp_path):
    """Issue 34's target: FT_TrainLoRA's defaults at rank 16 on Z-Image's architecture (random weights,
    ``configs/zimage``: the 6.15 B transformer, Qwen3-4B, the Flux VAE) at 1024 px, batch 1, the model as Load Z-Image's
    auto leaves it (bf16, the VAE in fp32, offloaded): Qwen3-4B encodes the captions and leaves before the transformer
    comes, and the training holds under 16 GB of GPU memory (``max_memory_allocated``); FT_Sample at 1024 px, each part
    visiting in turn, too. ``benchmarks/zimage_memory.py`` counts the same stages on a CPU."""
    model = benchmark_models().zimage_model(torch.bfloat16, "cpu")
    trained, sampled = lora_at_1024_px(model, 4, LoRARecipe(steps=2, batch_size=1, seed=0, rank=16), tmp_path)
    print(f"Z-Image LoRA (rank 16) at 1024 px: training {trained:.2f} GB, sampling {sampled:.2f} GB "
          "(max_memory_allocated)")
    assert trained < 16 and sampled < 16


@pytest.mark.cuda
@NO_GPU
def test_an_sdxl_dreambooth_with_prior_preservation_at_1024_px_in_10_gb(tmp_path):
    """FT_TrainDreamBooth's defaults on the same SDXL (LoRA, prior preservation): its 8 class pictures generated at
    1024 px in one batch, then 2 steps on 4 instance pictures and those 8, each under 10 GB (``benchmarks/
    sdxl_memory.py --method dreambooth`` counts 6.90 GB for the training on a CPU)."""
    from pathlib import Path

    from comfyui_finetune.trainers.data.dataset import Dataset, Example
    from comfyui_finetune.trainers.methods.class_pictures import class_images
    from comfyui_finetune.trainers.methods.dreambooth import Subject, train_dreambooth

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_step

    model = train_step.sdxl_model(torch.float16, "cpu")
    model.device, model.offload = torch.device("cuda"), True
    ds = Dataset([Example(p, "a photo of a sks thing", f"p{i}") for i, p in enumerate(train_step.pictures(4, 1024))],
                 resolution=1024)
    recipe = DreamBoothRecipe(steps=2, batch_size=1, seed=0, num_class_images=8, instance_prompt="a photo of a sks "
                              "thing", class_prompt="a photo of a thing")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(False):
        pics, made = class_images(model, recipe.class_prompt, 8, 1024, recipe.seed, tmp_path / "class")
        generated = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        t = train_dreambooth(recipe, model, [Subject(ds, recipe.instance_prompt, recipe.class_prompt)],
                             RunDir.create(tmp_path, "db"), class_cache=tmp_path / "class")  # the 8 from the cache
    trained = torch.cuda.max_memory_allocated() / 2**30
    print(f"SDXL DreamBooth at 1024 px: 8 class pictures {generated:.2f} GB, training {trained:.2f} GB "
          "(max_memory_allocated)")
    assert made and len(pics) == 8 and finite(t)
    assert generated < 10 and trained < 10


COMFYUI = os.environ.get("COMFYUI_PATH", "")
HANDOFF = r"""
import sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # ComfyUI, and a folder holding the pack as comfyui_finetune
import comfy.model_management as mm
import comfy.model_patcher
from comfyui_finetune.nodes import host
net = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)])  # 1 GiB in fp32
patcher = comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))
mm.load_models_gpu([patcher], force_full_load=True)
before = torch.cuda.memory_allocated()
assert before > 2**30 * 0.9, before
host.hand_over_gpu(torch.device("cuda"))
after = torch.cuda.memory_allocated()
print(before, after, len(mm.current_loaded_models))
assert after < 2**28 and not mm.current_loaded_models, (after, mm.current_loaded_models)
"""


@pytest.mark.cuda
@NO_GPU
@pytest.mark.skipif(not COMFYUI, reason="COMFYUI_PATH is not set: the hand-off is checked against ComfyUI's own "
                                        "model management")
def test_comfyui_models_leave_the_gpu_before_training(tmp_path):
    from pathlib import Path

    (tmp_path / "comfyui_finetune").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    res = subprocess.run([py, "-c", HANDOFF, COMFYUI, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FT_NO_PROGRESS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]


def test_mixed_precision_auto_is_the_models_own_half_precision(toy, monkeypatch):
    """On a GPU, auto autocasts a half-precision model in its own dtype (fp16 weights under bf16 autocast lose three
    bits of every weight, cast again at every op), and an fp32 model in bf16 only where the GPU has it in hardware:
    torch's default answer counts emulated bf16 (T4, V100), which is slow. Only the choice is asked here."""
    from comfyui_finetune.trainers.loop.precision import autocast_dtype

    auto, bf16 = LoRARecipe(mixed_precision="auto"), LoRARecipe(mixed_precision="bf16")
    m = toy.share()
    m.device = torch.device("cuda", 0)  # no weight moves: the choice reads the model's device and dtype
    for dt in (torch.float16, torch.bfloat16):
        m.dtype = dt
        assert autocast_dtype(m, auto) == dt
    assert autocast_dtype(m, bf16) == torch.bfloat16
    m.dtype = torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # T4: emulated
    for capability, want in (((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert autocast_dtype(m, auto) == want
