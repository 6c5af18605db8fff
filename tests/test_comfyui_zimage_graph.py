"""Z-Image end to end in a real ComfyUI server (runs when COMFYUI_PATH points at a checkout; slow): ComfyUI's own
nodes on files the pack wrote and a LoRA the pack trained, and the bridges both ways.

The model is the shallow, full-width Z-Image transformer (one main layer, two noise and two context refiners at width
3840; ComfyUI derives only the depth from the weights), a random Qwen3-4B of the full shape (36 layers, width 2560:
ComfyUI's Qwen3-4B has a fixed shape) and a random Flux VAE of the full shape. Both sides take turns on this 23 GB
machine: the pack builds, trains and saves in a process of its own that ends before ComfyUI loads anything, and
ComfyUI frees its models between graphs. The Qwen3-4B file is fp8 (e4m3, as the fp8 text encoders ComfyUI users
load): ComfyUI keeps it so (4 GB) and computes in fp32, the pack reads it into bf16 (8 GB); every value is an fp8
value, so both hold the same weights."""
from __future__ import annotations

import json
import shutil

import pytest

from comfy_server import ComfyServer, comfyui_path, made_apart, picture, skip_reason

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(comfyui_path() is None, reason=skip_reason())]

DIT = "ft_test/shallow-zimage.safetensors"
TE = "ft_test/random-qwen3-4b-fp8.safetensors"
VAE = "ft_test/random-flux-vae.safetensors"
LORA = "ft_test/shallow_zimage_lora"
PROMPT = "a photo of sks"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_zimage"), "--bf16-unet").start()
    yield srv
    srv.stop()
    for big in ("models", "output", "pack_output"):  # about 7 GB of Z-Image files; pytest keeps its last three
        shutil.rmtree(srv.base / big, ignore_errors=True)


@pytest.fixture(scope="module")
def made(server):
    """What the pack makes, in a process of its own (see :func:`make`)."""
    return made_apart("test_comfyui_zimage_graph", server.base)


def random_files(models) -> dict:
    """The three files, as ComfyUI users hold Z-Image: the transformer in models/diffusion_models (native layout,
    bf16), the Qwen3-4B in models/text_encoders (``model.*``, fp8) and the Flux VAE in models/vae (original layout)."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from comfyui_finetune.trainers.families.ldm import vae_key
    from comfyui_finetune.trainers.families.registry import FAMILIES
    from comfyui_finetune.trainers.families.zimage_native import to_native

    config = FAMILIES["zimage"].config_dir
    paths = {kind: models / kind / name for kind, name in (("diffusion_models", DIT), ("text_encoders", TE),
                                                           ("vae", VAE))}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.inference_mode(False):
        dit = ZImageTransformer2DModel(dim=3840, n_layers=1, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                                       cap_feat_dim=2560)
    weights = {"transformer": sum(p.numel() for p in dit.parameters())}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in to_native(dit.state_dict()).items()},
              str(paths["diffusion_models"]))
    del dit
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3Model(Qwen3Config(
            **json.loads((config / "text_encoder" / "config.json").read_text()))).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    te = {"model." + k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02).to(
        torch.float8_e4m3fn) for k, s in shapes.items()}
    weights["text_encoder"] = sum(t.numel() for t in te.values())
    save_file(te, str(paths["text_encoders"]))
    del te
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config / "vae")))
    n_up = len(vae.config.up_block_types)
    # the original layout's mid-block attention is 1x1 convolutions (ComfyUI's VAE will have no other shape)
    save_file({vae_key(k, n_up): (v[:, :, None, None] if ".mid.attn_1." in vae_key(k, n_up) and v.ndim == 2 else v)
               .contiguous() for k, v in vae.state_dict().items()}, str(paths["vae"]))
    weights["vae"] = sum(p.numel() for p in vae.parameters())
    return weights


def make(base) -> dict:
    """The pack's side: the three files, then Load Z-Image's reading of them (bf16), a LoRA trained on it by Train
    LoRA (2 steps) and written by Save LoRA."""
    import time

    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages
    from comfyui_finetune.nodes.io import FT_SaveLoRA
    from comfyui_finetune.nodes.train import FT_TrainLoRA
    from comfyui_finetune.trainers.model.zimage_files import load_zimage_files

    out, times = {}, {}
    models = base / "models"
    t = time.time()
    out["weights"] = random_files(models)
    times["build and write the three random files"] = time.time() - t
    host.set_folders(output=base / "pack_output", models=models)
    t = time.time()
    model = load_zimage_files(models / "diffusion_models" / DIT, models / "text_encoders" / TE, models / "vae" / VAE,
                              comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer", "cpu", "bf16")
    times["Load Z-Image (bf16)"] = time.time() - t
    ds = FT_DatasetFromImages().execute(torch.rand(2, 64, 64, 3), PROMPT, resolution=64)[0]
    t = time.time()
    _, lora, _ = FT_TrainLoRA().execute(model, ds, steps=2, learning_rate=1e-3, batch_size=1, rank=4, alpha=4.0,
                                        seed=0, run_name="zimage_lora")
    times["FT_TrainLoRA, 2 steps"] = time.time() - t
    (out["lora"],) = FT_SaveLoRA().execute(lora, LORA)["result"]
    out["modules"], out["keys"] = lora.modules(), len(lora.state)
    print("\n".join(f"{k}: {v:.0f} s" for k, v in times.items()))
    return out


def graph(text: str = PROMPT, lora: str | None = None, prefix: str = "zi", decode: bool = False) -> dict:
    """UNETLoader + CLIPLoader (lumina2) + VAELoader (-> LoraLoaderModelOnly) -> CLIPTextEncode -> a 64 px, 2-step
    euler / simple KSampler at cfg 1 -> SaveLatent (-> VAEDecode -> SaveImage)."""
    model = ["1", 0]
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT, "weight_dtype": "default"}},
         "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE, "type": "lumina2"}},
         "3": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}}}
    if lora:
        g["4"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                   "strength_model": 1.0}}
        model = ["4", 0]
    g.update({
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": text}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["5", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}"}},
    })
    if decode:
        g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}}
        g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}}
    return g


def load_zimage(dtype: str = "bf16") -> dict:
    return {"class_type": "FT_LoadZImage", "inputs": {"diffusion_model": DIT, "text_encoder": TE, "vae": VAE,
                                                      "device": "cpu", "dtype": dtype}}


def ft_sample(model: list, prefix: str) -> dict:
    """FT_Sample (64 px, 2 steps of the family's sampler, cfg 2, seed 0) -> SaveImage, as nodes "s1" and "s2"."""
    return {"s1": {"class_type": "FT_Sample", "inputs": {
                "model": model, "prompt": PROMPT, "negative_prompt": "", "seed": 0, "steps": 2, "cfg": 2.0,
                "sampler": "auto", "width": 64, "height": 64, "batch_size": 1}},
            "s2": {"class_type": "SaveImage", "inputs": {"images": ["s1", 0], "filename_prefix": prefix}}}


def run(server, prompt: dict) -> tuple[dict, str]:
    server.free()
    seen = len(server.log())
    entry = server.run_prompt(prompt, timeout=1800)
    log = server.log()[seen:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + log[-3000:]
    return entry, log


def latent_of(server, entry: dict, node: str = "8"):
    from safetensors.torch import load_file

    item = entry["outputs"][node]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_comfyui_draws_with_the_packs_z_image_files_and_lora(server, made):
    """UNETLoader, CLIPLoader and VAELoader read the three files as Z-Image (no missing or unexpected key), KSampler
    and VAEDecode draw from them, and the LoRA the pack trained loads in LoraLoaderModelOnly with every key and
    changes KSampler's result."""
    print(f"weights: {made['weights']}")
    assert made["weights"]["text_encoder"] == 4_022_468_096  # Qwen3-4B without its LM head
    plain, log = run(server, graph(prefix="zi_plain", decode=True))
    assert "model_type FLOW" in log, log[-2000:]
    unread = [ln for ln in log.splitlines() if "missing" in ln.lower() or "unexpected" in ln.lower()]
    assert not unread, unread[:3]
    img = picture(server, plain, "10")
    assert img.shape == (64, 64, 3) and img.std() > 0, "VAEDecode's picture is flat"
    tuned, log = run(server, graph(lora=made["lora"], prefix="zi_lora"))
    missed = [ln for ln in log.splitlines() if "lora key not loaded" in ln or "ERROR" in ln]
    assert not missed, f"{len(missed)} of {len(made['modules'])} modules not loaded, e.g. {missed[:3]}"
    diff = float((latent_of(server, tuned) - latent_of(server, plain)).abs().max())
    assert diff > 0, "the LoRA did not change KSampler's result"
    print(f"LoraLoaderModelOnly applied all {len(made['modules'])} modules of {made['lora']}; latent moved by "
          f"{diff:.3g}")


def test_z_image_travels_from_and_to_comfyui(server, made):
    """Model from ComfyUI on UNETLoader + CLIPLoader + VAELoader draws in FT_Sample the very picture Load Z-Image
    draws from the same files (bf16 both), and Load Z-Image -> Model to ComfyUI gives KSampler the very latent the
    three loaders give it."""
    from_comfy = graph()
    for k in ("5", "6", "7", "8"):
        del from_comfy[k]
    from_comfy["b"] = {"class_type": "FT_ModelFromComfy", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "device": "cpu", "dtype": "bf16"}}
    from_comfy.update(ft_sample(["b", 0], "zi_fromcomfy"))
    loaded = {"z": load_zimage(), **ft_sample(["z", 0], "zi_loadzimage")}
    pictures = {tag: picture(server, run(server, g)[0], "s2") for tag, g in (("fromcomfy", from_comfy),
                                                                            ("loadzimage", loaded))}
    assert pictures["loadzimage"].std() > 0, "the picture is flat: it shows nothing"
    gap = abs(pictures["fromcomfy"] - pictures["loadzimage"]).max()
    assert gap == 0, f"Model from ComfyUI's picture differs from Load Z-Image's by {gap}/255"

    to_comfy = graph(prefix="zi_tocomfy")
    to_comfy.update({"z": load_zimage(), "t": {"class_type": "FT_ModelToComfy", "inputs": {"model": ["z", 0]}}})
    for k in ("1", "2", "3"):
        del to_comfy[k]
    to_comfy["5"]["inputs"]["clip"] = ["t", 1]
    to_comfy["7"]["inputs"]["model"] = ["t", 0]
    native, _ = run(server, graph(prefix="zi_native"))
    entry, _ = run(server, to_comfy)
    diff = float((latent_of(server, entry) - latent_of(server, native)).abs().max())
    assert diff == 0, f"KSampler's latent from Model to ComfyUI differs from the three loaders' by {diff}"


def test_apply_lora_to_comfyui_model_is_loraloadermodelonly_on_the_saved_file(server, made):
    """A Z-Image LoRA trained in the graph, handed to ComfyUI's MODEL by Apply LoRA to ComfyUI Model, gives KSampler
    the very latent LoraLoaderModelOnly gives from the file Save LoRA wrote of it in the same graph."""
    g = graph(prefix="zi_applied")
    g.update({
        "z": load_zimage(),
        "d": {"class_type": "FT_ToyDataset", "inputs": {"color": "purple", "shape": "star", "count": 2,
                                                        "caption": PROMPT, "seed": 0, "geometry": "narrow",
                                                        "resolution": 64}},
        "l": {"class_type": "FT_TrainLoRA", "inputs": {"model": ["z", 0], "dataset": ["d", 0], "steps": 2,
                                                       "learning_rate": 1e-3, "batch_size": 1, "rank": 4,
                                                       "alpha": 4.0, "seed": 0, "target_modules": "auto",
                                                       "train_text_encoder": False, "text_encoder_lr": 0.0,
                                                       "run_name": "zi_graph"}},
        "s": {"class_type": "FT_SaveLoRA", "inputs": {"lora": ["l", 1], "filename": "ft_test/zi_graph"}},
        "a": {"class_type": "FT_ApplyLoRAToComfy", "inputs": {"model": ["1", 0], "clip": ["2", 0],
                                                              "lora": ["l", 1], "strength_model": 1.0,
                                                              "strength_clip": 1.0}},
    })
    g["5"]["inputs"]["clip"] = ["a", 1]
    g["7"]["inputs"]["model"] = ["a", 0]
    applied, _ = run(server, g)
    name = next((f for f in (server.base / "models" / "loras" / "ft_test").glob("zi_graph*.safetensors")), None)
    assert name is not None, "Save LoRA wrote no file"
    loaded, log = run(server, graph(lora=f"ft_test/{name.name}", prefix="zi_loaded"))
    assert "lora key not loaded" not in log
    diff = float((latent_of(server, applied) - latent_of(server, loaded)).abs().max())
    moved = float((latent_of(server, loaded) - latent_of(server, run(server, graph(prefix="zi_base"))[0])).abs().max())
    assert moved > 0, "the LoRA did not change KSampler's result"
    assert diff == 0, f"Apply LoRA to ComfyUI Model's latent differs from LoraLoaderModelOnly's by {diff}"
