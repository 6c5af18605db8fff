"""Integration at full SDXL size (runs when COMFYUI_PATH points at a checkout; slow): an SDXL-architecture model
with random weights (2.6 B UNet weights, CLIP ViT-L and OpenCLIP bigG), written by the pack as one original-layout
file, is what ComfyUI recognises as SDXL; on it, the pack's LoRA (UNet + both encoders) loads in LoraLoader with
every key and changes KSampler's result, its SDXL embedding works as ``embedding:name``, its saved fine-tune loads
in CheckpointLoaderSimple, a ControlNet it trains from the UNet's encoder loads in ControlNetLoader with every key
(both layouts) and drives KSampler, a checkpoint ComfyUI writes loads in the pack with every weight equal, and the
model itself travels both ways between ComfyUI's graph and the pack's nodes (Model from / to ComfyUI).

The pack and ComfyUI take turns on this 23 GB machine: the pack builds, trains and saves in bf16 (about 7 GB) and
lets go of its model before ComfyUI loads one (``--bf16-unet``: 5 GB for its UNet), and ComfyUI frees its models
before the pack reads ComfyUI's file back."""
from __future__ import annotations

import gc
import json

import pytest

from comfy_server import (ComfyServer, checked_in_comfyui, comfyui_path, ft_sample, load_controlnet_in_comfyui, made_apart,
                         picture, skip_reason)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(comfyui_path() is None, reason=skip_reason())]

BASE = "ft_test/random-sdxl.safetensors"
BASE_BF16 = "ft_test/random-sdxl-bf16.safetensors"  # the same weights rounded to bf16, the pack's precision here


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import shutil

    srv = ComfyServer(tmp_path_factory.mktemp("comfy_sdxl"), "--bf16-unet").start()
    yield srv
    srv.stop()
    for big in ("models", "output", "pack_output"):  # about 43 GB of SDXL files; pytest keeps its last three
        shutil.rmtree(srv.base / big, ignore_errors=True)


@pytest.fixture(scope="module")
def made(server):
    """What the pack makes on the full-size random SDXL, in a process of its own that ends before ComfyUI loads
    anything (so every byte of it is returned): see :func:`make`."""
    return made_apart("test_comfyui_sdxl", server.base)


def make(base) -> dict:
    """The pack's side, through its nodes: the base file (written from random weights), a LoRA over the UNet and
    both encoders, an embedding (and its zero-vector twin) and the LoRA merged into a saved fine-tune."""
    import dataclasses
    import time

    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.controlnet import FT_SaveControlNet
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages
    from comfyui_finetune.nodes.io import FT_ApplyLoRA, FT_SaveCheckpoint, FT_SaveEmbedding, FT_SaveLoRA
    from comfyui_finetune.nodes.train import FT_TrainControlNet, FT_TrainLoRA, FT_TrainTextualInversion
    from comfyui_finetune.trainers.model import loading
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.runs.export import write_safetensors

    from comfy_server import random_model

    out, times = {}, {}
    path = base / "models" / "checkpoints" / BASE
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    model = random_model("sdxl", torch.float16)
    out["weights"] = {name: sum(p.numel() for p in m.parameters()) for name, m in model.parts().items()}
    write_safetensors(path, to_single_file(model, torch.float16), {})
    write_safetensors(path.with_name(BASE_BF16.split("/")[-1]), to_single_file(model, torch.bfloat16), {})
    del model
    release()  # room for the file's reading
    times["build and write the random SDXL"] = time.time() - t
    host.set_folders(output=base / "pack_output", models=base / "models")  # the runs' checkpoints: 13 GB
    t = time.time()
    model = loading.load_single_file(path, comfyui_path() / "comfy" / "sd1_tokenizer", "cpu", "bf16")
    times["load the file (bf16)"] = time.time() - t
    assert model.family.name == "sdxl" and model.native_size == 1024 and model.prediction_type == "epsilon"
    ds = FT_DatasetFromImages().execute(torch.rand(2, 64, 64, 3), "a photo of sks", resolution=64)[0]
    t = time.time()
    trained, lora, _ = FT_TrainLoRA().execute(model, ds, steps=1, learning_rate=1e-4, batch_size=1, rank=4,
                                              alpha=4.0, seed=0, train_text_encoder=True, text_encoder_lr=5e-5,
                                              run_name="sdxl_lora")
    times["FT_TrainLoRA, 1 step"] = time.time() - t
    (out["lora"],) = FT_SaveLoRA().execute(lora, "ft_test/random_sdxl")["result"]
    out["modules"], out["keys"] = lora.modules(), len(lora.state)
    t = time.time()
    words = FT_DatasetFromImages().execute(torch.rand(2, 64, 64, 3), "a photo of <ft-xl>", resolution=64)[0]
    taught, emb, _ = FT_TrainTextualInversion().execute(model, words, "<ft-xl>", "photo", 2, 1, 5e-3, 1, 0,
                                                         "dataset captions", "sdxl_ti")
    times["FT_TrainTextualInversion, 1 step"] = time.time() - t
    out["vectors"] = [list(emb.vectors.shape), list(emb.vectors_2.shape)]
    (out["embedding"],) = FT_SaveEmbedding().execute(emb, "ft_test/xl_thing")["result"]
    zero = dataclasses.replace(emb, vectors=torch.zeros_like(emb.vectors),
                               vectors_2=torch.zeros_like(emb.vectors_2))
    (out["zero"],) = FT_SaveEmbedding().execute(zero, "ft_test/xl_thing_zero")["result"]
    t = time.time()
    (tuned,) = FT_ApplyLoRA().execute(model, "", 1.0, lora=lora)
    (out["tuned"],) = FT_SaveCheckpoint().execute(tuned, "ft_test/random_sdxl_tuned",
                                                  "single file (.safetensors)", "bf16")["result"]
    times["FT_ApplyLoRA + FT_SaveCheckpoint (bf16)"] = time.time() - t
    del tuned, trained, taught, emb, zero
    release()
    t = time.time()  # a ControlNet from the UNet's encoder (1.25 B weights, fp32), one step: SGD keeps it in memory
    cn, log = FT_TrainControlNet().execute(model, ds, "canny", 1, 1e-4, 1, 0, 0.5, "sdxl_cn", optimizer="sgd",
                                           gradient_checkpointing="on")
    times["FT_TrainControlNet, 1 step (SGD)"] = time.time() - t
    out["controlnet_weights"] = sum(p.numel() for p in cn.net.parameters())
    out["controlnet_moved"] = float(cn.net.controlnet_mid_block.weight.abs().max())
    out["controlnets"] = [FT_SaveControlNet().execute(cn, f"ft_test/random_sdxl_canny_{layout}", layout,
                                                      "fp16")["result"][0] for layout in ("original", "diffusers")]
    print("\n".join(f"{k}: {v:.0f} s" for k, v in times.items()))
    return out


def release() -> None:
    """Collect, and hand freed heap memory back to the system: glibc keeps the many few-MB blocks of a freed SDXL in
    its heap (malloc_trim gives them back), and ComfyUI's process needs them next."""
    import ctypes
    import ctypes.util

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def latent_of(server, entry: dict, node: str):
    from safetensors.torch import load_file

    item = entry["outputs"][node]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def sample(ckpt: str, text: str, lora: str | None = None, prefix: str = "ft_xl", decode: bool = False) -> dict:
    """CheckpointLoaderSimple (-> LoraLoader) -> one 64x64 KSampler step -> SaveLatent (-> VAEDecode)."""
    clip, model = ["1", 1], ["1", 0]
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if lora:
        g["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                         "strength_model": 1.0, "strength_clip": 1.0}}
        clip, model = ["2", 1], ["2", 0]
    g.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}},
    })
    if decode:
        g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
        g["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return g


def run(server, prompt: dict) -> tuple[dict, str]:
    seen = len(server.log())
    entry = server.run_prompt(prompt, timeout=1200)
    log = server.log()[seen:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + log[-3000:]
    return entry, log


def test_comfyui_recognises_the_packs_sdxl_file(server, made):
    entry, log = run(server, sample(BASE, "a photo", decode=True))
    assert "model_type EPS" in log and "SDXL" in log, log[-2000:]
    print(f"weights: {made['weights']}")
    assert made["weights"]["unet"] == 2_567_463_684 and made["weights"]["text_encoder_2"] == 694_659_840


def test_an_sdxl_lora_loads_in_loraloader_with_every_key_and_changes_ksamplers_result(server, made):
    from safetensors import safe_open

    with safe_open(str(server.base / "models" / "loras" / made["lora"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    mods = made["modules"]
    assert {m.split("_")[1] for m in mods} == {"unet", "te1", "te2"}
    plain, _ = run(server, sample(BASE, "a photo of sks", prefix="ft_xl_plain"))
    tuned, log = run(server, sample(BASE, "a photo of sks", made["lora"], prefix="ft_xl_lora"))
    missed = [ln for ln in log.splitlines() if "lora key not loaded" in ln or "ERROR" in ln]
    assert not missed, f"{len(missed)} of {len(mods)} modules not loaded, e.g. {missed[:3]}"
    diff = float((latent_of(server, tuned, "7") - latent_of(server, plain, "7")).abs().max())
    assert diff > 0, "the LoRA did not change KSampler's result"
    got = checked_in_comfyui("lora", server.base / "models" / "loras" / made["lora"])
    assert got.get("by") == "ComfyUI" and got["applied"] == got["total"] == made["keys"], got
    print(f"LoraLoader applied all {len(mods)} modules of {made['lora']} (UNet, te1, te2); latent moved by {diff:.3g};"
          f" Save LoRA's load check: {got['text']}")


def test_an_sdxl_embedding_works_as_embedding_name(server, made):
    assert made["vectors"] == [[2, 768], [2, 1280]]  # clip_l and clip_g
    results = []
    for name in (made["embedding"], made["zero"]):
        stem = name.removesuffix(".safetensors")
        entry, log = run(server, sample(BASE, f"a photo of embedding:{stem}", prefix=stem.replace("/", "_")))
        bad = [ln for ln in log.splitlines() if "embedding" in ln.lower() and "warning" in ln.lower()]
        assert not bad, bad[:3]
        results.append(latent_of(server, entry, "7"))
    diff = float((results[0] - results[1]).abs().max())
    assert diff > 0, "the embedding's vectors did not change CLIPTextEncode's result"
    root = server.base / "models" / "embeddings"
    got = checked_in_comfyui("embedding", root / made["embedding"], root=str(root))
    assert got.get("text") == "checked by ComfyUI: 4 of 4 vectors applied", got  # 2 of clip_l, 2 of clip_g
    print(f"embedding:{made['embedding']} vs its zero twin: latent differs by {diff:.3g}; {got['text']}")


def test_a_fine_tune_saved_single_file_loads_in_checkpointloadersimple(server, made):
    """Save Checkpoint's SDXL file (a LoRA merged into the base) has the keys ComfyUI's own CheckpointSave writes
    for SDXL, loads in CheckpointLoaderSimple and samples; it differs from the base where the LoRA was merged."""
    from safetensors import safe_open

    server.free()
    save = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
            "2": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "filename_prefix": "checkpoints/ft_comfy_sdxl"}}}
    run(server, save)
    server.free()
    entry, log = run(server, sample(made["tuned"], "a photo", prefix="ft_xl_tuned", decode=True))
    assert "SDXL" in log
    with safe_open(str(server.base / "models" / "checkpoints" / made["tuned"]), framework="pt") as f:
        ours = set(f.keys())
    (comfy,) = sorted((server.base / "output" / "checkpoints").glob("ft_comfy_sdxl*.safetensors"))
    with safe_open(str(comfy), framework="pt") as f:
        theirs = {k for k in f.keys() if k.startswith(("model.", "first_stage_model.", "conditioner."))}
    assert ours - theirs == set(), sorted(ours - theirs)[:5]
    only_comfyui = theirs - ours
    assert only_comfyui <= {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                            "conditioner.embedders.1.model.logit_scale"}, sorted(only_comfyui)[:5]
    print(f"{made['tuned']}: {len(ours)} keys, the same as ComfyUI's CheckpointSave less {sorted(only_comfyui)}")


def test_an_sdxl_controlnet_the_pack_trains_loads_in_controlnetloader_with_every_key(server, made):
    assert made["controlnet_moved"] > 0, "one step must move the zero convolutions"
    server.free()
    for name in made["controlnets"]:  # both layouts, every key
        assert load_controlnet_in_comfyui(server.base / "models" / "controlnet" / name) == made["controlnet_weights"]
        got = checked_in_comfyui("controlnet", server.base / "models" / "controlnet" / name,
                                 layout="original" if name.endswith("original.safetensors") else "diffusers",
                                 dtype="fp16")
        assert got.get("by") == "ComfyUI" and got["applied"] == got["total"], got
    g = sample(BASE, "a photo", prefix="ft_xl_cn")
    g["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": made["controlnets"][0]}}
    g["21"] = {"class_type": "FT_ToyDataset", "inputs": {"color": "blue", "shape": "square", "count": 1,
                                                         "caption": "x", "seed": 0, "geometry": "broad"}}
    g["22"] = {"class_type": "ImageScale", "inputs": {"image": ["21", 1], "upscale_method": "nearest-exact",
                                                      "width": 64, "height": 64, "crop": "disabled"}}
    g["23"] = {"class_type": "FT_CannyEdges", "inputs": {"image": ["22", 0], "low_threshold": 0.1,
                                                         "high_threshold": 0.2}}
    g["24"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "control_net": ["20", 0], "image": ["23", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}}
    g["6"]["inputs"].update(positive=["24", 0], negative=["24", 1])
    run(server, g)
    print(f"ControlNetLoader read {made['controlnets']} ({made['controlnet_weights']} weights, no missing or "
          "unexpected key); ControlNetLoader -> ControlNetApplyAdvanced -> KSampler ran with the first")


def test_a_checkpoint_written_by_comfyui_loads_in_the_pack_with_every_weight_equal(server, made):
    """ComfyUI's CheckpointSave file (its bf16 UNet, fp16 CLIPs, fp32 VAE) read by the pack in bf16: written back in
    the original layout, every tensor equals ComfyUI's, rounded to bf16 as loading rounds it."""
    import torch
    from safetensors import safe_open

    from comfyui_finetune.trainers.model import loading
    from comfyui_finetune.trainers.model.checkpoint import to_single_file

    (comfy,) = sorted((server.base / "output" / "checkpoints").glob("ft_comfy_sdxl*.safetensors"))
    server.free()
    model = loading.load_single_file(comfy, comfyui_path() / "comfy" / "sd1_tokenizer", "cpu", "bf16")
    assert model.family.name == "sdxl"
    ours = to_single_file(model, torch.bfloat16)
    del model
    release()
    checked, unequal = 0, []
    with safe_open(str(comfy), framework="pt") as f:
        for k in f.keys():
            if k.endswith(("position_ids", "logit_scale")) or not k.startswith(
                    ("model.", "first_stage_model.", "conditioner.")):
                continue
            assert k in ours, f"the pack lost {k}"
            want = f.get_tensor(k).to(torch.bfloat16)
            if not torch.equal(ours[k].reshape(want.shape), want):
                unequal.append(k)
            checked += 1
    assert not unequal, f"{len(unequal)} of {checked} tensors differ, e.g. {unequal[:3]}"
    print(f"{comfy.name}: all {checked} tensors equal after a round trip through the pack")


def test_the_model_travels_from_and_to_comfyui_at_full_size(server, made):
    """Model from ComfyUI on CheckpointLoaderSimple's full-size SDXL draws in FT_Sample the very picture Load Base
    Model draws from the same file (bf16 both: the same weights), and Load Base Model -> Model to ComfyUI gives
    KSampler the very latent CheckpointLoaderSimple gives it from the file of the same weights. One prompt at a time,
    ComfyUI freeing its models between them: its model and the pack's fit beside each other (not three copies)."""
    import time

    times = {}

    def timed(tag, graph):
        server.free()
        t = time.time()
        entry, _ = run(server, graph)
        times[tag] = time.time() - t
        return entry

    def load_base(name):
        return {"class_type": "FT_LoadBaseModel", "inputs": {"model_name": f"checkpoints/{name}", "device": "cpu",
                                                             "dtype": "bf16"}}

    graphs = {
        "fromcomfy": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
                      "2": {"class_type": "FT_ModelFromComfy", "inputs": {
                          "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "device": "cpu", "dtype": "bf16"}}},
        "loadbase": {"2": load_base(BASE)},
    }
    pictures = {tag: picture(server, timed(tag, ft_sample(g, tag, ["2", 0])), f"{tag}2") for tag, g in graphs.items()}
    gap = abs(pictures["fromcomfy"] - pictures["loadbase"]).max()
    assert pictures["loadbase"].std() > 0, "the picture is flat: it shows nothing"
    assert gap == 0, f"Model from ComfyUI's picture differs from Load Base Model's by {gap}/255"

    to_comfy = sample(BASE, "a photo of sks", prefix="ft_xl_tocomfy")  # its node 1 is Model to ComfyUI instead
    to_comfy.update({"0": load_base(BASE), "1": {"class_type": "FT_ModelToComfy", "inputs": {"model": ["0", 0]}}})
    latents = {tag: latent_of(server, timed(tag, g), "7") for tag, g in (
        ("tocomfy", to_comfy), ("native", sample(BASE_BF16, "a photo of sks", prefix="ft_xl_native")))}
    diff = float((latents["tocomfy"] - latents["native"]).abs().max())
    assert diff == 0, f"KSampler's latent from Model to ComfyUI differs from CheckpointLoaderSimple's by {diff}"
    print("\n".join(f"{tag}: {times[tag]:.0f} s" for tag in times))


def test_an_sdxl_preview_drawn_by_comfyui_is_what_loraloader_and_ksampler_draw(server, made):
    """Load Base Model (bf16) -> Train LoRA with validation_sampler comfyui: its preview equals, within 1/255, what
    the saved LoRA gives through CheckpointLoaderSimple -> LoraLoader -> KSampler -> VAEDecode at the same seed,
    sampler, scheduler, steps and cfg. The pack's model and ComfyUI's copy of it (--bf16-unet) fit side by side."""
    import numpy as np
    from PIL import Image

    server.free()
    graph = {
        "1": {"class_type": "FT_LoadBaseModel", "inputs": {"model_name": f"checkpoints/{BASE_BF16}", "device": "cpu",
                                                           "dtype": "bf16"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x884422}},
        "3": {"class_type": "FT_DatasetFromImages", "inputs": {"images": ["2", 0], "captions": "a photo of sks",
                                                               "resolution": 64}},
        "4": {"class_type": "FT_TrainLoRA", "inputs": {
            "model": ["1", 0], "dataset": ["3", 0], "steps": 1, "learning_rate": 1e-2, "batch_size": 1, "rank": 4,
            "alpha": 4.0, "seed": 0, "target_modules": "attention", "train_text_encoder": True,
            "text_encoder_lr": 0.0, "run_name": "xl-preview", "validation_prompt": "a photo of sks",
            "validation_every": 1, "validation_images": 1, "validation_sampler": "comfyui",
            "validation_sampler_name": "euler", "validation_scheduler": "normal", "validation_steps": 1,
            "validation_cfg": 1.0}},
        "5": {"class_type": "FT_SaveLoRA", "inputs": {"lora": ["4", 1], "filename": "ft_test/xl_preview"}},
    }
    entry, log = run(server, graph)
    assert "validation pictures: ComfyUI's sampler (euler, normal, 1 steps, cfg 1" in log, log[-2000:]
    (shown,) = [im for im in entry["outputs"]["4"]["images"] if im["filename"] == "step-1-0.png"]
    preview = np.asarray(Image.open(server.base / "output" / shown["subfolder"] / shown["filename"]), dtype=float)
    lora = entry["outputs"]["5"]["text"][0].removeprefix("saved loras/")
    server.free()
    native = sample(BASE_BF16, "a photo of sks", lora=lora, prefix="ft_xl_preview")
    native["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    native["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ft_xl_preview"}}
    again, _ = run(server, native)
    drawn = picture(server, again, "9")
    gap = abs(preview - drawn).max()
    print(f"SDXL: the ComfyUI-drawn preview vs {lora} through LoraLoader + KSampler + VAEDecode: max difference "
          f"{gap:g}/255")
    assert preview.shape == drawn.shape == (64, 64, 3) and gap <= 1, gap
