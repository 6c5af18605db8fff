"""Integration: the bridges between the pack's types and ComfyUI's MODEL / CLIP / VAE, in a real ComfyUI server.

A server of their own: each test holds several SD 1.5 copies, which next to test_comfyui.py's server and models
would not fit a 24 GB machine."""
from __future__ import annotations

import json
import re

import pytest

from comfy_server import ComfyServer, comfyui_path, ft_sample, picture, random_sd15_model, skip_reason

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(comfyui_path() is None, reason=skip_reason())]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy-bridges")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def random_sd15(server):
    return random_sd15_model(server.base)


# ------------------------------------------------------------------------- bridges to ComfyUI's own types --
@pytest.fixture(scope="module")
def bridge_ckpt(server, random_sd15):
    """The random SD1.5 model as a single fp16 file in models/checkpoints, for CheckpointLoaderSimple and
    FT_LoadBaseModel alike."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint

    saved = dict(host._fallback)
    host.set_folders(models=server.base / "models")
    try:
        (name,) = FT_SaveCheckpoint().execute(random_sd15, "ft_test/bridge_sd15", "single file (.safetensors)",
                                              "fp16")["result"]
    finally:
        host._fallback.update(saved)
    return name


def native_sample(graph: dict, tag: str, model: list, clip: list, vae: list, prompt: str = "a photo of sks",
                  seed: int = 0) -> dict:
    """Add ComfyUI's own CLIPTextEncode -> KSampler (64 px, 2 euler steps, cfg 2) -> VAEDecode -> SaveImage."""
    graph.update({
        f"{tag}1": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": prompt}},
        f"{tag}2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        f"{tag}3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{tag}4": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{tag}1", 0], "negative": [f"{tag}2", 0], "latent_image": [f"{tag}3", 0],
            "seed": seed, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        f"{tag}5": {"class_type": "VAEDecode", "inputs": {"samples": [f"{tag}4", 0], "vae": vae}},
        f"{tag}6": {"class_type": "SaveImage", "inputs": {"images": [f"{tag}5", 0], "filename_prefix": f"ft_{tag}"}},
    })
    return graph


def run_ok(server, graph: dict) -> dict:
    entry = server.run_prompt(graph, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + server.log()[-3000:]
    return entry


def test_bridge_lora_trained_in_the_graph_samples_as_loraloader_does(server, bridge_ckpt):
    """Load Checkpoint -> Model from ComfyUI -> Train LoRA (2 steps) -> Apply LoRA to ComfyUI Model -> KSampler
    gives the picture that Save LoRA's file gives through ComfyUI's own LoraLoader, and another than no LoRA; and
    Model from ComfyUI bakes LoraLoader's patches in: FT_Sample draws what the pack's Apply LoRA on the file draws."""
    import time

    server.free(wait=5)  # each bridge test holds several SD 1.5 copies
    start = time.time()
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": bridge_ckpt}}
    graph = {
        "1": ckpt,
        "2": {"class_type": "FT_ModelFromComfy", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                            "device": "cpu", "dtype": "fp32"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x884422}},
        "4": {"class_type": "FT_DatasetFromImages", "inputs": {"images": ["3", 0], "captions": "a photo of sks",
                                                               "resolution": 64}},
        "5": {"class_type": "FT_TrainLoRA", "inputs": {
            "model": ["2", 0], "dataset": ["4", 0], "steps": 2, "learning_rate": 1e-3, "batch_size": 1, "rank": 4,
            "alpha": 4.0, "seed": 0, "target_modules": "attention", "train_text_encoder": True,
            "text_encoder_lr": 0.0, "run_name": "bridge"}},
        "6": {"class_type": "FT_SaveLoRA", "inputs": {"lora": ["5", 1], "filename": "ft_test/bridge_lora"}},
        "7": {"class_type": "FT_ApplyLoRAToComfy", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora": ["5", 1],
                                                              "strength_model": 1.0, "strength_clip": 1.0}},
    }
    native_sample(graph, "bridged", ["7", 0], ["7", 1], ["1", 2])
    native_sample(graph, "plain", ["1", 0], ["1", 1], ["1", 2])
    entry = run_ok(server, graph)
    lora_name = entry["outputs"]["6"]["text"][0].removeprefix("saved loras/")
    checked = entry["outputs"]["6"]["text"][1]  # Save LoRA's load check, run inside ComfyUI by its own loader
    assert re.fullmatch(r"checked by ComfyUI: (\d+) of \1 keys applied", checked), checked
    loader = {"1": ckpt, "2": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}}}
    native_sample(loader, "loraloader", ["2", 0], ["2", 1], ["1", 2])
    # the other way: LoraLoader's patches baked into Model from ComfyUI = the pack's own Apply LoRA on the file
    loader["3"] = {"class_type": "FT_ModelFromComfy", "inputs": {"model": ["2", 0], "clip": ["2", 1],
                                                                 "vae": ["1", 2], "device": "cpu", "dtype": "fp32"}}
    loader["4"] = {"class_type": "FT_LoadBaseModel", "inputs": {"model_name": f"checkpoints/{bridge_ckpt}",
                                                                "device": "cpu", "dtype": "fp32"}}
    loader["5"] = {"class_type": "FT_ApplyLoRA", "inputs": {"model": ["4", 0], "lora_name": lora_name,
                                                            "strength": 1.0}}
    ft_sample(ft_sample(loader, "patchedfrom", ["3", 0]), "ftapplied", ["5", 0])
    seen = len(server.log())
    again = run_ok(server, loader)
    assert "lora key not loaded" not in server.log()[seen:]
    bridged, plain = picture(server, entry, "bridged6"), picture(server, entry, "plain6")
    native = picture(server, again, "loraloader6")
    gap, change = abs(bridged - native).max(), abs(bridged - plain).max()
    baked = abs(picture(server, again, "patchedfrom2") - picture(server, again, "ftapplied2")).max()
    print(f"Apply LoRA to ComfyUI Model vs LoraLoader on the saved file: max pixel difference {gap:g}/255; "
          f"the LoRA changes the picture by up to {change:g}/255; Model from ComfyUI on LoraLoader's model vs "
          f"Apply LoRA (finetune) in FT_Sample: {baked:g}/255 ({time.time() - start:.0f} s)")
    assert gap < 1, f"the bridge and LoraLoader differ by {gap}/255"
    assert change > 0, "the LoRA did not change KSampler's picture"
    assert baked <= 2, f"LoraLoader's patches were not baked into Model from ComfyUI: {baked}/255 apart"


def test_bridge_model_from_comfyui_samples_as_load_base_model_does(server, bridge_ckpt):
    """FT_ModelFromComfy on CheckpointLoaderSimple's outputs draws in FT_Sample the picture FT_LoadBaseModel draws
    from the same file."""
    import time

    server.free(wait=5)  # each bridge test holds several SD 1.5 copies
    start = time.time()
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": bridge_ckpt}},
        "2": {"class_type": "FT_ModelFromComfy", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                            "device": "cpu", "dtype": "fp32"}},
        "3": {"class_type": "FT_LoadBaseModel", "inputs": {"model_name": f"checkpoints/{bridge_ckpt}",
                                                           "device": "cpu", "dtype": "fp32"}},
    }
    ft_sample(graph, "fromcomfy", ["2", 0])
    ft_sample(graph, "loadbase", ["3", 0])
    entry = run_ok(server, graph)
    gap = abs(picture(server, entry, "fromcomfy2") - picture(server, entry, "loadbase2")).max()
    print(f"Model from ComfyUI vs Load Base Model in FT_Sample: max pixel difference {gap:g}/255 "
          f"({time.time() - start:.0f} s)")
    assert gap < 1, f"the pictures differ by {gap}/255"


def test_bridge_model_to_comfyui_round_trips(server, bridge_ckpt):
    """FT_LoadBaseModel -> FT_ModelToComfy samples in KSampler as CheckpointLoaderSimple on the same file does, and
    CheckpointLoaderSimple -> FT_ModelFromComfy -> FT_ModelToComfy -> CheckpointSave keeps every weight."""
    import time

    from safetensors import safe_open

    server.free(wait=5)  # each bridge test holds several SD 1.5 copies
    start = time.time()
    graph = {
        "1": {"class_type": "FT_LoadBaseModel", "inputs": {"model_name": f"checkpoints/{bridge_ckpt}",
                                                           "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "FT_ModelToComfy", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": bridge_ckpt}},
    }
    native_sample(graph, "tocomfy", ["2", 0], ["2", 1], ["2", 2])
    native_sample(graph, "native", ["3", 0], ["3", 1], ["3", 2])
    entry = run_ok(server, graph)
    gap = abs(picture(server, entry, "tocomfy6") - picture(server, entry, "native6")).max()
    print(f"Model to ComfyUI vs CheckpointLoaderSimple in KSampler: max pixel difference {gap:g}/255")
    assert gap < 1, f"the pictures differ by {gap}/255"
    server.free(wait=5)  # each bridge test holds several SD 1.5 copies
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": bridge_ckpt}},
        "2": {"class_type": "FT_ModelFromComfy", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                            "device": "cpu", "dtype": "fp32"}},
        "3": {"class_type": "FT_ModelToComfy", "inputs": {"model": ["2", 0]}},
        "4": {"class_type": "CheckpointSave", "inputs": {"model": ["3", 0], "clip": ["3", 1], "vae": ["3", 2],
                                                         "filename_prefix": "checkpoints/ft_bridge_round_trip"}},
    }
    run_ok(server, graph)
    (saved,) = sorted((server.base / "output" / "checkpoints").glob("ft_bridge_round_trip*.safetensors"))
    worst, compared = 0.0, 0
    with safe_open(str(server.base / "models" / "checkpoints" / bridge_ckpt), framework="pt") as a, \
            safe_open(str(saved), framework="pt") as b:
        theirs = set(b.keys())
        for k in a.keys():
            assert k in theirs, f"{k} did not come back"
            worst = max(worst, float((a.get_tensor(k).float() - b.get_tensor(k).float()).abs().max()))
            compared += 1
    print(f"Model from ComfyUI -> Model to ComfyUI: {compared} weights, largest difference {worst:g} "
          f"({time.time() - start:.0f} s)")
    assert worst == 0, f"a weight changed by {worst}"  # fp16 in the file: every fp32 copy holds it exactly


# ------------------------------------------------------------------------ previews drawn by ComfyUI itself --
#: validation as native_sample draws: 2 pictures (seeds 0 and 1), 2 euler steps on the normal schedule, cfg 2
PREVIEW = {"validation_every": 2, "validation_images": 2, "validation_sampler": "comfyui",
           "validation_sampler_name": "euler", "validation_scheduler": "normal", "validation_steps": 2,
           "validation_cfg": 2.0}
TRAINERS = {
    "lora": ("FT_TrainLoRA", "a photo of sks", {
        "rank": 4, "alpha": 4.0, "target_modules": "attention", "train_text_encoder": True, "text_encoder_lr": 0.0}),
    "dreambooth": ("FT_TrainDreamBooth", "a photo of sks", {
        "instance_prompt": "a photo of sks", "class_prompt": "a photo", "prior_preservation": False,
        "prior_loss_weight": 1.0, "num_class_images": 1, "mode": "lora", "train_text_encoder": False, "rank": 4}),
    "textual_inversion": ("FT_TrainTextualInversion", "a photo of <ft-thing>", {
        "token": "<ft-thing>", "init_token": "photo", "num_vectors": 2, "caption_mode": "dataset captions"}),
}


def samples_of(server, entry: dict, node: str, step: int) -> list:
    """The validation pictures a training node kept for ``step`` (its ui's images), as floats 0..255."""
    import numpy as np
    from PIL import Image

    found = sorted((im for im in entry["outputs"][node]["images"] if im["filename"].startswith(f"step-{step}-")),
                   key=lambda im: im["filename"])
    return [np.asarray(Image.open(server.base / "output" / im["subfolder"] / im["filename"]), dtype=np.float64)
            for im in found]


def trained_with_previews(server, ckpt: dict, prompt: str, trainer: dict, save: dict) -> tuple[dict, list]:
    """Run CheckpointLoaderSimple -> Model from ComfyUI -> a flat-coloured 2-picture dataset captioned ``prompt`` ->
    ``trainer`` (node 5: its class and inputs; validation as :data:`PREVIEW`, drawn by ComfyUI) -> ``save`` (node
    6); returns the run's entry and the validation pictures of its last step (2)."""
    graph = {
        "1": ckpt,
        "2": {"class_type": "FT_ModelFromComfy", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                            "device": "cpu", "dtype": "fp32"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x884422}},
        "4": {"class_type": "FT_DatasetFromImages", "inputs": {"images": ["3", 0], "captions": prompt,
                                                               "resolution": 64}},
        "5": {"class_type": trainer["class_type"], "inputs": {
            "model": ["2", 0], "dataset": ["4", 0], "steps": 2, "batch_size": 1, "seed": 0,
            "validation_prompt": prompt, **PREVIEW, **trainer["inputs"]}},
        "6": save,
    }
    seen = len(server.log())
    entry = run_ok(server, graph)
    assert "validation pictures: ComfyUI's sampler (euler, normal, 2 steps, cfg 2" in server.log()[seen:]
    return entry, samples_of(server, entry, "5", 2)


@pytest.mark.parametrize("method", sorted(TRAINERS))
def test_preview_drawn_by_comfyui_is_what_loraloader_and_ksampler_draw(server, bridge_ckpt, method):
    """validation_sampler comfyui: each validation picture of the last step equals, within 1/255, what the saved
    file gives through ComfyUI's own LoraLoader (or embedding:<name>) + KSampler + VAEDecode at the same seed,
    sampler, scheduler, steps and cfg."""
    server.free(wait=5)
    node, prompt, extra = TRAINERS[method]
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": bridge_ckpt}}
    save = ("FT_SaveEmbedding", "embedding") if method == "textual_inversion" else ("FT_SaveLoRA", "lora")
    entry, previews = trained_with_previews(
        server, ckpt, prompt, {"class_type": node, "inputs": {"learning_rate": 1e-2, "run_name": f"preview-{method}",
                                                               **extra}},
        {"class_type": save[0], "inputs": {save[1]: ["5", 1], "filename": f"ft_test/preview_{method}"}})
    saved = entry["outputs"]["6"]["text"][0].split(":")[0].split("/", 1)[1]
    native = {"1": ckpt}
    if method == "textual_inversion":
        clip, text = ["1", 1], prompt.replace("<ft-thing>", f"embedding:{saved.removesuffix('.safetensors')}")
    else:
        native["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": saved,
                                                              "strength_model": 1.0, "strength_clip": 1.0}}
        clip, text = ["2", 1], prompt
    model = ["2", 0] if "2" in native else ["1", 0]
    for seed in (0, 1):
        native_sample(native, f"native{seed}", model, clip, ["1", 2], prompt=text, seed=seed)
    native_sample(native, "base", ["1", 0], ["1", 1], ["1", 2], prompt=prompt)
    again = run_ok(server, native)
    drawn = [picture(server, again, f"native{seed}6") for seed in (0, 1)]
    gaps = [abs(p - d).max() for p, d in zip(previews, drawn)]
    change = abs(drawn[0] - picture(server, again, "base6")).max()
    print(f"{method}: ComfyUI-drawn previews vs {saved} through ComfyUI's own nodes: max differences {gaps} /255; "
          f"what trained changes the picture by up to {change:g}/255")
    assert len(previews) == 2 and max(gaps) <= 1, gaps
    assert previews[0].shape == (64, 64, 3) and abs(previews[0] - previews[1]).max() > 0


def test_a_controlnet_preview_drawn_by_comfyui_is_what_controlnetloader_and_ksampler_draw(server, bridge_ckpt):
    """Train ControlNet with validation_sampler comfyui: its preview equals, within 1/255, Save ControlNet's file
    through ControlNetLoader + Apply ControlNet (Advanced) + KSampler + VAEDecode on the run's condition. The
    training pictures are flat, so their Canny condition is a black picture: EmptyImage's black is the same one."""
    server.free(wait=5)
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": bridge_ckpt}}
    prompt = "a photo of sks"
    entry, previews = trained_with_previews(
        server, ckpt, prompt, {"class_type": "FT_TrainControlNet", "inputs": {
            "preprocessor": "canny", "learning_rate": 1e-3, "caption_dropout": 0.0, "run_name": "preview-controlnet"}},
        {"class_type": "FT_SaveControlNet", "inputs": {"control_net": ["5", 0], "filename": "ft_test/preview_controlnet",
                                                       "layout": "original", "dtype": "fp16"}})
    saved = entry["outputs"]["6"]["text"][0].removeprefix("saved controlnet/")  # ComfyUI's own loader drew with it
    native = {"1": ckpt,
              "2": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": saved}},
              "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}}
    for seed in (0, 1):
        native_sample(native, f"native{seed}", ["1", 0], ["1", 1], ["1", 2], prompt=prompt, seed=seed)
        native[f"native{seed}c"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": [f"native{seed}1", 0], "negative": [f"native{seed}2", 0], "control_net": ["2", 0],
            "image": ["3", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        sampler = native[f"native{seed}4"]["inputs"]
        sampler["positive"], sampler["negative"] = [f"native{seed}c", 0], [f"native{seed}c", 1]
    again = run_ok(server, native)
    gaps = [abs(p - picture(server, again, f"native{seed}6")).max() for seed, p in zip((0, 1), previews)]
    print(f"controlnet: ComfyUI-drawn previews vs {saved} through ControlNetLoader + Apply ControlNet (Advanced) + "
          f"KSampler: max differences {gaps} /255")
    assert len(previews) == 2 and max(gaps) <= 1, gaps
