"""Integration: the pack inside a real ComfyUI server (runs when COMFYUI_PATH points at a checkout)."""
from __future__ import annotations

import json

import pytest

from comfy_server import (PACK, ComfyServer, checked_in_comfyui, comfyui_path, load_controlnet_in_comfyui, pack_import, random_model,
                         random_sd15_model, skip_reason)

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(comfyui_path() is None, reason=skip_reason())]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy")).start()
    yield srv
    srv.stop()


#: the nodes that hand models to and from ComfyUI's own types, listed only inside ComfyUI
BRIDGES = {"FT_ApplyLoRAToComfy", "FT_ModelFromComfy", "FT_ModelToComfy"}
#: a pack that imports torch-heavy libraries at load time slows every ComfyUI start; ours imports them lazily
PACK_IMPORT_LIMIT_S = 5.0


def test_pack_loads_and_lists_its_nodes(server):
    log = server.log()
    imported = pack_import(log)
    assert imported is not None, "no import-time line for the pack in ComfyUI's log:\n" + log[-3000:]
    seconds, failed = imported
    assert not failed, "ComfyUI could not import the pack:\n" + log[-3000:]
    print(f"the pack imports in {seconds:.1f} s inside ComfyUI")
    assert seconds < PACK_IMPORT_LIMIT_S, f"the pack took {seconds:.1f} s to import (heavy imports belong in execute)"
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("FT_")}
    from comfyui_finetune import NODE_CLASS_MAPPINGS

    inside = set(NODE_CLASS_MAPPINGS) | BRIDGES  # the bridges are registered only where ComfyUI is importable
    assert set(ours) == inside, inside ^ set(ours)
    for name, node in ours.items():
        assert node["category"].startswith("finetune/"), name
        assert node["python_module"].startswith("custom_nodes."), name
    assert "toy (built-in)" in json.dumps(ours["FT_LoadBaseModel"]["input"])


def test_templates_are_listed(server):
    templates = server.get("/workflow_templates")
    assert "toy_text_to_image" in templates.get("comfyui-finetune", []), templates


def load_checkpoint_and_sample(ckpt_name: str) -> dict:
    """API graph: CheckpointLoaderSimple -> one 64x64 KSampler step -> VAEDecode -> PreviewImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }


API_EXAMPLES = sorted((PACK / "example_workflows" / "api").glob("*.json"))


@pytest.mark.parametrize("path", API_EXAMPLES, ids=[p.stem for p in API_EXAMPLES])
def test_api_example_runs(server, path, request):
    """The very JSON the headless runner runs also runs in ComfyUI (training under its inference mode too)."""
    prompt = json.loads(path.read_text())
    if path.stem == "riffusion_sound":  # a Riffusion checkpoint cannot be had here: SD 1.5 with random weights
        stand_in_riffusion(server, request.getfixturevalue("random_sd15"), prompt)
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    for nid, node in prompt.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            images = entry["outputs"][nid]["images"]
            assert images, f"node {nid} produced no image"
            if node["class_type"] == "SaveImage":
                for img in images:
                    assert (server.base / "output" / img["subfolder"] / img["filename"]).is_file()
    if path.stem == "toy_text_to_image":
        assert len(entry["outputs"]["3"]["images"]) == 4
    if path.stem == "toy_sound_lora":
        heard_in_comfyui(server, prompt, entry)
    if path.stem == "riffusion_sound":  # the format only: 5.12 s at 44.1 kHz from one 512 x 512 picture
        (saved,) = entry["outputs"]["8"]["audio"]
        waves = decoded_by_comfyui([server.base / "output" / saved["subfolder"] / saved["filename"]])
        assert len(waves[0]) == 512 * 441 and np_finite_and_sounding(waves[0])
    if path.stem == "toy_train_lora":  # queued again unchanged: ComfyUI's cache answers, nothing retrains
        again = server.run_prompt(prompt)
        cached = [n for event, data in again["status"]["messages"] if event == "execution_cached"
                  for n in data["nodes"]]
        assert "3" in cached, again["status"]["messages"]
        # a workflow saved when gradient_checkpointing was a switch: ComfyUI's combo check is the node's own
        (trainer,) = [n for n, v in prompt.items() if v["class_type"] == "FT_TrainLoRA"]
        old = json.loads(json.dumps(prompt))
        old[trainer]["inputs"].update(gradient_checkpointing=False, steps=20)
        assert server.run_prompt(old)["status"]["status_str"] == "success"
        old[trainer]["inputs"]["gradient_checkpointing"] = "sometimes"  # ComfyUI still runs the outputs left valid
        errors = server.post("/prompt", {"prompt": old, "client_id": "ft-tests"}).get("node_errors", {})
        assert "gradient_checkpointing 'sometimes' is not known; choose one of" in json.dumps(errors.get(trainer))


def stand_in_riffusion(server, random_sd15, prompt: dict) -> None:
    """An SD 1.5 single file with random weights where the Riffusion example expects its checkpoint (written by the
    pack's Save Checkpoint, read by ComfyUI's Load Checkpoint), and 2 sampling steps instead of 30 (CPU time)."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint

    target = server.base / "models" / "checkpoints" / prompt["1"]["inputs"]["ckpt_name"]
    if not target.is_file():
        saved = dict(host._fallback)
        host.set_folders(models=server.base / "models")
        try:
            (name,) = FT_SaveCheckpoint().execute(random_sd15, target.stem, "single file (.safetensors)",
                                                  "fp16")["result"]
        finally:
            host._fallback.update(saved)
        assert name == target.name, name
    prompt["5"]["inputs"]["steps"] = 2


def np_finite_and_sounding(wave) -> bool:
    import numpy as np

    return bool(np.isfinite(wave).all() and np.abs(wave).max() > 0.01)


def decoded_by_comfyui(files: list) -> list:
    """Sound files decoded by PyAV in ComfyUI's environment (the tests' may lack it): the first channel, float32."""
    import os
    import subprocess
    import sys

    import numpy as np

    decode = ("import av, sys, numpy as np\n"
              "for path in sys.argv[1:]:\n"
              "    parts = []\n"
              "    with av.open(path) as f:\n"
              "        for fr in f.decode(audio=0):\n"
              "            a, n = fr.to_ndarray(), len(fr.layout.channels)\n"
              "            parts.append(a[0] if fr.format.is_planar else a.reshape(-1, n)[:, 0])\n"
              "    x = np.concatenate(parts)\n"
              "    scale = np.iinfo(x.dtype).max + 1.0 if x.dtype.kind in 'iu' else 1.0\n"
              "    np.save(path + '.npy', (x / scale).astype(np.float32))\n")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)  # ComfyUI's environment has PyAV
    subprocess.run([python, "-c", decode, *map(str, files)], check=True, timeout=120)
    return [np.load(str(f) + ".npy") for f in files]


def heard_in_comfyui(server, prompt: dict, entry: dict) -> None:
    """The sound example's files, written by ComfyUI's own SaveAudio (FLAC through PyAV), decoded by PyAV in
    ComfyUI's environment and judged: the LoRA's 'a sks tone' plays the note it was taught."""
    from comfyui_finetune.trainers.audio.judge import judge_many

    (tuned,) = [n for n, v in prompt.items() if v["_meta"]["title"] == "LoRA" and v["class_type"] == "SaveAudio"]
    files = [server.base / "output" / a["subfolder"] / a["filename"] for a in entry["outputs"][tuned]["audio"]]
    assert len(files) == 4 and all(f.suffix == ".flac" and f.is_file() for f in files)
    waves = decoded_by_comfyui(files)
    assert all(len(w) == 8192 for w in waves)
    res = judge_many(waves, 8000, "d")
    assert res["note_acc"] >= 0.75, res["counts"]


@pytest.fixture(scope="module")
def random_sd15(server):
    """An SD1.5-architecture model with random weights, in ComfyUI's models/diffusers folder."""
    return random_sd15_model(server.base)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_trained_lora_loads_in_comfyui_loraloader_with_every_key(server, random_sd15, tmp_path, kind):
    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages
    from comfyui_finetune.nodes.io import FT_SaveLoRA
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    saved = dict(host._fallback)
    host.set_folders(output=tmp_path, models=server.base / "models")
    try:
        ds = FT_DatasetFromImages().execute(torch.rand(2, 64, 64, 3), "a photo of sks", resolution=64)[0]
        _, lora, _ = FT_TrainLoRA().execute(random_sd15, ds, steps=2, learning_rate=1e-4, batch_size=1, rank=4,
                                            alpha=4.0, seed=0, target_modules="attention+feedforward+conv",
                                            train_text_encoder=True, text_encoder_lr=0.0, run_name="sd15",
                                            adapter=kind)
        out = FT_SaveLoRA().execute(lora, f"ft_test/random_sd15_{kind}")
        (name,) = out["result"]
    finally:
        host._fallback.update(saved)
    n_modules = len(lora.modules())
    n_keys = len(lora.state)
    assert out["ui"]["text"][1] == f"checked by the pack's reader: {n_keys} of {n_keys} keys applied"
    got = checked_in_comfyui("lora", server.base / "models" / "loras" / name)
    assert got == {"text": f"checked by ComfyUI: {n_keys} of {n_keys} keys applied", "by": "ComfyUI",
                   "applied": n_keys, "total": n_keys}, got
    prompt = {
        "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "random-sd15"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a photo of sks"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    seen = len(server.log())
    entry = server.run_prompt(prompt, timeout=900)
    log = server.log()[seen:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + log[-3000:]
    missed = [ln for ln in log.splitlines() if "lora key not loaded" in ln or "ERROR" in ln]
    assert not missed, f"{len(missed)} of {n_modules} {kind} modules not loaded, e.g. {missed[:3]}"
    assert lora.kind == kind
    print(f"ComfyUI LoraLoader applied all {n_modules} modules of {name} ({kind})")


def test_load_check_names_every_key_comfyui_would_ignore(server, random_sd15, tmp_path):
    """A LoRA file with a renamed module and a key under a wrong prefix: the load check (ComfyUI's key map for the
    SD 1.5 model, ComfyUI's load_lora) names exactly those keys and passes the rest."""
    import torch
    from safetensors.torch import save_file

    from comfyui_finetune.trainers.methods.lora import model_kohya_names

    every = sorted(model_kohya_names(random_sd15))
    unet = [n for n in every if n.startswith("lora_unet_") and n.endswith("attn1_to_q")][:2]
    names = unet + [n for n in every if n.startswith("lora_te_") and n.endswith("mlp_fc1")][:2]
    state = {}
    for n in names:
        state.update({f"{n}.lora_down.weight": torch.zeros(4, 8), f"{n}.lora_up.weight": torch.zeros(8, 4),
                      f"{n}.alpha": torch.tensor(4.0)})
    bad = {f"{unet[0]}x.lora_down.weight", "lora_unt_" + unet[1].removeprefix("lora_unet_") + ".lora_up.weight"}
    state.update({k: torch.zeros(4, 8) for k in bad})
    path = tmp_path / "bad_lora.safetensors"
    save_file(state, str(path))
    got = checked_in_comfyui("lora-keys", path, family="sd15")
    assert got["total"] == len(state) and set(got["ignored"]) == bad, got


#: ComfyUI's own patch arithmetic, in its own python: for each module of a file, the weight LoraLoader would give
#: at each strength (``comfy.lora.load_lora`` + ``calculate_weight``, the functions ModelPatcher calls)
PATCH_PROBE = """
import json, sys
lora_path, weights_path, strengths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.argv = [sys.argv[0], '--cpu']  # ComfyUI reads its flags when imported
import comfy.options
comfy.options.enable_args_parsing()
import comfy.lora, comfy.utils
lora, ref = comfy.utils.load_torch_file(lora_path), comfy.utils.load_torch_file(weights_path)
names = sorted({k.split('.')[0] for k in lora})
patches = comfy.lora.load_lora(lora, {n: n for n in names})
worst = 0.0
for s in strengths:
    for n in names:
        got = comfy.lora.calculate_weight([(s, patches[n], 1.0, None, None)], ref['base.' + n].clone(), n)
        want = ref[f'pack{s}.' + n]
        worst = max(worst, float((got.reshape(want.shape) - want).abs().max() / (want.abs().max() + 1e-12)))
print(json.dumps({'modules': len(patches), 'of': len(names), 'worst': worst}))
"""


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_the_pack_applies_each_kind_as_comfyui_computes_it(toy, tmp_path, kind):
    """Not only every key matched: the weights the pack's FT_ApplyLoRA computes from a file equal the weights
    ComfyUI's own code computes from it, module by module, at strength 1 and 0.6 (DoRA's decomposition included)."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from comfyui_finetune.trainers.methods.lora import attach_lora, kohya_names

    from test_adapter_kinds import random_adapter

    model = toy.share()
    with torch.inference_mode(False):  # DoRA's magnitudes (1, in) stay near their start, the norms
        method, _ = random_adapter(model, 3.0, kind, shift=lambda p: p.abs().mean() if p.shape[0] == 1 else 0.0)
        lora = method.result("probe", {})
    weights = {}
    for s in (1.0, 0.6):
        tuned = attach_lora(toy.share(), lora, s)
        mods = {**kohya_names(tuned.unet, "unet"), **kohya_names(tuned.text_encoder, "text_encoder")}
        base = {**kohya_names(toy.unet, "unet"), **kohya_names(toy.text_encoder, "text_encoder")}
        for n in lora.modules():
            weights[f"pack{s}.{n}"] = mods[n].weight.detach().float().contiguous()
            weights[f"base.{n}"] = base[n].weight.detach().float().contiguous()
    save_file(lora.state, str(tmp_path / "probe.safetensors"))
    save_file(weights, str(tmp_path / "weights.safetensors"))
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", PATCH_PROBE,
                          str(tmp_path / "probe.safetensors"), str(tmp_path / "weights.safetensors"), "[1.0, 0.6]"],
                         cwd=comfyui_path(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind}: ComfyUI patched {res['modules']} of {res['of']} modules; worst relative difference to the "
          f"pack {res['worst']:.2e}")
    assert res["modules"] == res["of"] == len(lora.modules())
    assert res["worst"] < 1e-5


def test_single_file_checkpoint_written_by_comfyui_loads_in_the_pack(server, random_sd15, tmp_path):
    """ComfyUI's CheckpointSave writes the original single-file layout; FT_LoadBaseModel reads it offline
    with the shipped SD1.5 config (and ComfyUI's tokenizer), giving back the same weights."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.models import FT_LoadBaseModel

    prompt = {
        "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "random-sd15"}},
        "2": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "filename_prefix": "checkpoints/ft_random_sd15"}},
    }
    entry = server.run_prompt(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    saved = sorted((server.base / "output" / "checkpoints").glob("ft_random_sd15*.safetensors"))
    assert saved
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "random15.safetensors").symlink_to(saved[-1])
    before = dict(host._fallback)
    host.set_folders(models=tmp_path)
    try:
        from comfyui_finetune.trainers.model import loading

        model = loading.load_single_file(host.model_path("checkpoints", "random15.safetensors"),
                                         comfyui_path() / "comfy" / "sd1_tokenizer", "cpu", "fp32")
        assert "checkpoints/random15.safetensors" in FT_LoadBaseModel.INPUT_TYPES()["required"]["model_name"][0]
    finally:
        host._fallback.update(before)
    assert model.family.name == "sd15"
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(model, name).state_dict(), getattr(random_sd15, name).state_dict()
        shared = [k for k in ref if k in ours]
        assert len(shared) >= 0.95 * len(ref), f"{name}: only {len(shared)} of {len(ref)} weights matched by name"
        diffs = {k: float((ours[k].float() - ref[k].float()).abs().max()) for k in shared}
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] < 1e-2, f"{name}: {worst} differs by {diffs[worst]}"


def test_embedding_trained_by_the_pack_works_in_comfyui_prompts(server, random_sd15, tmp_path):
    """An embedding trained on the SD1.5 architecture is found by CLIPTextEncode's embedding:name and its
    vectors reach the result: a zero-vector twin of the same file gives a different picture."""
    import dataclasses

    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages
    from comfyui_finetune.nodes.io import FT_SaveEmbedding
    from comfyui_finetune.nodes.train import FT_TrainTextualInversion

    saved = dict(host._fallback)
    host.set_folders(output=tmp_path, models=server.base / "models")
    try:
        ds = FT_DatasetFromImages().execute(torch.rand(2, 64, 64, 3), "a photo of <ft-thing>", resolution=64)[0]
        _, emb, _ = FT_TrainTextualInversion().execute(random_sd15, ds, "<ft-thing>", "photo", 2, 2, 5e-3, 1, 0,
                                                       "dataset captions", "sd15-ti")
        (name,) = FT_SaveEmbedding().execute(emb, "ft_test/thing")["result"]
        zero = dataclasses.replace(emb, vectors=torch.zeros_like(emb.vectors))
        (zname,) = FT_SaveEmbedding().execute(zero, "ft_test/thing_zero")["result"]
    finally:
        host._fallback.update(saved)
    assert emb.vectors.shape == (2, 768)
    root = server.base / "models" / "embeddings"
    got = checked_in_comfyui("embedding", root / name, root=str(root))
    assert got.get("text") == "checked by ComfyUI: 2 of 2 vectors applied", got

    def picture(embedding_name: str) -> dict:
        stem = embedding_name.removesuffix(".safetensors")
        return {
            "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "random-sd15"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": f"a photo of embedding:{stem}"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0],
                                                       "negative": ["4", 0], "latent_image": ["5", 0], "seed": 0,
                                                       "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                       "scheduler": "normal", "denoise": 1.0}},
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"ft_emb_{stem.replace('/', '_')}"}},
        }

    import numpy as np
    from PIL import Image

    pics = []
    for n in (name, zname):
        entry = server.run_prompt(picture(n), timeout=900)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
        img = entry["outputs"]["8"]["images"][0]
        pics.append(np.asarray(Image.open(server.base / "output" / img["subfolder"] / img["filename"]), dtype=float))
    log = server.log()
    assert "thing" not in "\n".join(ln for ln in log.splitlines() if "embedding" in ln.lower() and "warning" in ln.lower())
    assert np.abs(pics[0] - pics[1]).max() > 0, "the embedding's vectors did not change CLIPTextEncode's output"


def test_full_checkpoint_saved_by_the_pack_loads_in_checkpointloadersimple(server, random_sd15, tmp_path):
    """A full-mode DreamBooth step on the SD1.5 architecture, saved by FT_SaveCheckpoint: the single file has
    exactly the keys ComfyUI's own CheckpointSave writes for such a model, loads in CheckpointLoaderSimple and
    samples; the pack reads it back with the same weights. (SGD and gradient checkpointing keep the 860 M-parameter
    full fine-tune inside this machine's memory beside the server.)"""
    import gc

    import torch
    from safetensors import safe_open

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint
    from comfyui_finetune.nodes.train import FT_TrainDreamBooth
    from comfyui_finetune.trainers.model import loading

    import time

    server.post("/free", {"unload_models": True, "free_memory": True})  # room for the full fine-tune
    time.sleep(5)  # ComfyUI's prompt worker applies the flags on its next turn
    saved = dict(host._fallback)
    host.set_folders(output=tmp_path, models=server.base / "models")
    try:
        ds = FT_DatasetFromImages().execute(torch.rand(1, 64, 64, 3), "x", resolution=64)[0]
        tuned, lora, _, _ = FT_TrainDreamBooth().execute(
            random_sd15, ds, "a photo of sks", "a photo", False, 1.0, 1, "full", False, 1, 1e-4, 1, 0, "sd15-full",
            optimizer="sgd", gradient_checkpointing="on")
        assert lora is None and tuned.history[-1]["trained"] == "dreambooth-full"
        moved = any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), random_sd15.unet.parameters()))
        assert moved, "one full-mode step should change the UNet"
        (name,) = FT_SaveCheckpoint().execute(tuned, "ft_test/random_full", "single file (.safetensors)",
                                              "fp16")["result"]
    finally:
        host._fallback.update(saved)
    reference = {part: {k: v.half().float() for k, v in getattr(tuned, part).state_dict().items()}
                 for part in ("unet", "vae", "text_encoder")}
    del tuned
    gc.collect()
    path = server.base / "models" / "checkpoints" / name
    with safe_open(str(path), framework="pt") as f:
        ours = set(f.keys())
    comfy_files = sorted((server.base / "output" / "checkpoints").glob("ft_random_sd15*.safetensors"))
    if comfy_files:  # written by the single-file test above
        with safe_open(str(comfy_files[-1]), framework="pt") as f:
            theirs = {k for k in f.keys() if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
        assert ours - theirs == set(), sorted(ours - theirs)[:5]
        assert theirs - ours <= {"cond_stage_model.transformer.text_model.embeddings.position_ids"}, \
            sorted(theirs - ours)[:5]
    got = checked_in_comfyui("checkpoint", path, family="sd15")
    assert got.get("by") == "ComfyUI" and got["applied"] == got["total"] == len(ours), got
    prompt = load_checkpoint_and_sample(name)
    entry = server.run_prompt(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    back = loading.load_single_file(path, comfyui_path() / "comfy" / "sd1_tokenizer", "cpu", "fp32")
    for part, ref in reference.items():
        a = getattr(back, part).state_dict()
        worst = max(float((a[k] - ref[k]).abs().max()) for k in ref if k in a)
        assert worst < 1e-3, f"{part} differs by {worst}"


def test_a_diffusers_folder_saved_by_the_pack_loads_in_diffusersloader_with_every_weight(server, random_sd15,
                                                                                        tmp_path):
    """Save Checkpoint's diffusers folder: read back by the pack's reader here (every tensor of every part), and
    inside ComfyUI by DiffusersLoader's own load_diffusers, every loaded weight equal to the model's. The server lets
    its models go first: the probe holds the pack's model and ComfyUI's (10.5 GB), and was killed for memory beside
    them."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint

    server.free()
    saved = dict(host._fallback)
    host.set_folders(output=tmp_path, models=server.base / "models")
    try:
        out = FT_SaveCheckpoint().execute(random_sd15, "ft_test/sd15_folder", "diffusers folder", "fp16")
    finally:
        host._fallback.update(saved)
    total = sum(len(p.state_dict()) for p in random_sd15.parts().values())
    assert out["ui"]["text"][1] == f"checked by the pack's reader: {total} of {total} tensors applied", out["ui"]
    got = checked_in_comfyui("folder", server.base / "models" / "diffusers" / out["result"][0])
    assert got.get("by") == "ComfyUI" and got["applied"] == got["total"] > 1000, got
    print(f"{out['result'][0]}: {got['text']}")


def test_sd2_single_file_checkpoint_loads_in_comfyui_and_back(server, tmp_path):
    """SD 2.x: the OpenCLIP text-encoder layout (fused in_proj, resblocks) is written, ComfyUI's
    CheckpointLoaderSimple loads and samples it, and the pack reads it back with the same weights."""
    import gc
    import time

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint
    from comfyui_finetune.trainers.model import loading

    server.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(5)
    gc.collect()
    model = random_model("sd2", seed=1)
    tok_dir = comfyui_path() / "comfy" / "sd1_tokenizer"
    saved = dict(host._fallback)
    host.set_folders(output=tmp_path, models=server.base / "models")
    try:
        (name,) = FT_SaveCheckpoint().execute(model, "ft_test/random_sd2", "single file (.safetensors)",
                                              "fp16")["result"]
    finally:
        host._fallback.update(saved)
    reference = {part: {k: v.half().float() for k, v in getattr(model, part).state_dict().items()}
                 for part in ("unet", "vae", "text_encoder")}
    del model
    gc.collect()
    prompt = load_checkpoint_and_sample(name)
    entry = server.run_prompt(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    server.post("/free", {"unload_models": True, "free_memory": True})
    path = server.base / "models" / "checkpoints" / name
    back = loading.load_single_file(path, tok_dir, "cpu", "fp32")
    assert back.family.name == "sd2"
    # what it predicts, told from the weights as ComfyUI tells it: a fresh model's norm biases are zero (no spread),
    # as in the 512 px base models (epsilon); the same file with a wide spread there is read as a 768 px v model
    assert (back.prediction_type, back.native_size) == ("epsilon", 512), back.describe()
    for part, ref in reference.items():
        a = getattr(back, part).state_dict()
        shared = [k for k in ref if k in a]
        assert len(shared) >= 0.95 * len(ref), f"{part}: {len(shared)} of {len(ref)} weights matched by name"
        worst = max(float((a[k] - ref[k]).abs().max()) for k in shared)
        assert worst < 1e-3, f"{part} differs by {worst}"
    del back, reference, a
    gc.collect()  # one SD 2.x model in memory at a time (next to the module's SD 1.5 it fills a 24 GB machine)
    _check_sd2_prediction_like_comfyui(path, tok_dir)


def _check_sd2_prediction_like_comfyui(path, tok_dir) -> None:
    """The pack's and ComfyUI's reading of an SD 2.x file agree: epsilon as written, v-prediction once the marker
    bias has the spread of a v model (ComfyUI's model detection run in its own python on the same two files)."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    from comfyui_finetune.trainers.model import loading
    from comfyui_finetune.trainers.families.registry import SD2_MARKER

    state = load_file(str(path))
    state[SD2_MARKER] = (torch.randn(state[SD2_MARKER].shape) * 0.3).to(state[SD2_MARKER].dtype)
    v_path = path.with_name(path.stem + "_v.safetensors")
    save_file(state, str(v_path))
    del state
    import gc

    gc.collect()
    seen = []
    for prediction in ("auto", "epsilon"):
        model = loading.load_single_file(v_path, tok_dir, "cpu", "fp32", prediction=prediction)
        seen.append((model.prediction_type, model.native_size, model.prediction_source))
        del model
        gc.collect()
    assert seen == [("v_prediction", 768, "detected from the weights"),
                    ("epsilon", 512, "set by the prediction input")], seen
    probe = ("import sys\n"
             "paths, sys.argv = sys.argv[1:], [sys.argv[0], '--cpu']  # ComfyUI reads its flags when imported\n"
             "import comfy.options\n"
             "comfy.options.enable_args_parsing()\n"
             "import comfy.utils, comfy.model_detection as d\n"
             "for p in paths:\n"
             "    sd = comfy.utils.load_torch_file(p)\n"
             "    cfg = d.model_config_from_unet(sd, 'model.diffusion_model.')\n"
             "    print(type(cfg).__name__, cfg.model_type(sd, 'model.diffusion_model.').name)\n")
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", probe, str(path), str(v_path)],
                         cwd=comfyui_path(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["SD20", "EPS", "SD20", "V_PREDICTION"], out.stdout + out.stderr[-2000:]
    v_path.unlink()


def test_preprocessors_run_in_comfyui(server):
    """The kornia preprocessors run inside ComfyUI and their IMAGE output feeds its native nodes."""
    toy = {"class_type": "FT_ToyDataset", "inputs": {"color": "blue", "shape": "square", "count": 2,
                                                     "caption": "x", "seed": 0, "geometry": "broad"}}
    prompt = {"1": toy,
              "2": {"class_type": "FT_CannyEdges", "inputs": {"image": ["1", 1], "low_threshold": 0.4,
                                                              "high_threshold": 0.8}},
              "3": {"class_type": "FT_Scribble", "inputs": {"image": ["1", 1], "threshold": 0.3, "thickness": 3}},
              "4": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
              "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
              "6": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    assert len(entry["outputs"]["5"]["images"]) == 2 and len(entry["outputs"]["6"]["images"]) == 2


def test_controlnet_trained_by_the_pack_runs_in_comfyui(server, random_sd15, tmp_path):
    """A ControlNet trained a few steps on the SD 1.5 architecture and saved by the pack loads in ComfyUI's own
    ControlNetLoader with every key, and drives ControlNetApplyAdvanced -> KSampler with the pack's Canny map."""
    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.controlnet import FT_SaveControlNet
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages
    from comfyui_finetune.nodes.train import FT_TrainControlNet

    saved = dict(host._fallback)
    host.set_folders(output=tmp_path, models=server.base / "models")
    try:
        ds = FT_DatasetFromImages().execute(torch.rand(2, 64, 64, 3), "a photo", resolution=64)[0]
        cn, log = FT_TrainControlNet().execute(random_sd15, ds, "canny", 2, 1e-4, 1, 0, 0.5, "sd15-cn",
                                               optimizer="sgd", gradient_checkpointing="on")
        (name,) = FT_SaveControlNet().execute(cn, "ft_test/random_sd15_canny", "original", "fp16")["result"]
        (diffusers_name,) = FT_SaveControlNet().execute(cn, "ft_test/random_sd15_canny_diffusers", "diffusers",
                                                        "fp16")["result"]
    finally:
        host._fallback.update(saved)
    moved = float(cn.net.controlnet_mid_block.weight.abs().max())
    assert log.steps == 2 and moved > 0, "the zero convolutions must have moved"
    for file_name in (name, diffusers_name):  # both layouts, every key
        n_params = load_controlnet_in_comfyui(server.base / "models" / "controlnet" / file_name)
        assert n_params == sum(p.numel() for p in cn.net.parameters()), file_name
        layout = "original" if file_name == name else "diffusers"
        got = checked_in_comfyui("controlnet", server.base / "models" / "controlnet" / file_name, layout=layout,
                                 dtype="fp16")
        n_keys = len(cn.net.state_dict())
        assert got.get("text") == f"checked by ComfyUI: {n_keys} of {n_keys} weights applied", got
    prompt = {
        "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "random-sd15"}},
        "2": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "FT_ToyDataset", "inputs": {"color": "blue", "shape": "square", "count": 1,
                                                        "caption": "x", "seed": 0, "geometry": "broad"}},
        "6": {"class_type": "ImageScale", "inputs": {"image": ["5", 1], "upscale_method": "nearest-exact",
                                                     "width": 64, "height": 64, "crop": "disabled"}},
        "7": {"class_type": "FT_CannyEdges", "inputs": {"image": ["6", 0], "low_threshold": 0.1,
                                                        "high_threshold": 0.2}},
        "8": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "control_net": ["2", 0], "image": ["7", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["8", 0], "negative": ["8", 1],
                                                    "latent_image": ["9", 0], "seed": 0, "steps": 2, "cfg": 2.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
    entry = server.run_prompt(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + server.log()[-3000:]
    assert len(entry["outputs"]["12"]["images"]) == 1
    print(f"ComfyUI's ControlNet loader read {name} and {diffusers_name} ({n_params} parameters, no missing or "
          "unexpected key); ControlNetLoader -> ControlNetApplyAdvanced -> KSampler ran with the first")


def _interrupt_when(server, ready, timeout: float = 300) -> None:
    """POST /interrupt (ComfyUI's Cancel button) once ``ready()`` is true."""
    import time

    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"never ready to cancel:\n{server.log()[-3000:]}"
        time.sleep(0.3)
    server.post("/interrupt", {})


def _queue(server, prompt: dict) -> str:
    return server.post("/prompt", {"prompt": prompt, "client_id": "ft-tests"})["prompt_id"]


def _finished(server, pid: str, timeout: float = 300) -> dict:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            return hist[pid]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {pid} did not end:\n{server.log()[-3000:]}")


def _interrupted_in(entry: dict) -> str | None:
    """The node ComfyUI says it was interrupted in (an error instead is no interruption: None)."""
    events = dict(entry["status"]["messages"])
    if "execution_error" in events or "execution_interrupted" not in events:
        return None
    return events["execution_interrupted"].get("node_type")


def test_cancel_in_comfyui_keeps_the_training_and_stops_sampling(server):
    """ComfyUI's Cancel (POST /interrupt) during a training: ComfyUI reports an interruption, not an error, and the
    run keeps the checkpoint of the step that finished and says cancelled; during FT_Sample it stops too."""
    import time

    prompt = json.loads((PACK / "example_workflows" / "api" / "toy_train_lora.json").read_text())
    train = {k: prompt[k] for k in ("1", "2", "3", "7", "11")}  # the loss plot and its preview: an output
    train["3"]["inputs"].update(steps=5000, save_every=0, validation_every=0, run_name="cancel_me")
    runs = server.base / "output" / "finetune"
    before = set(runs.glob("cancel_me*")) if runs.is_dir() else set()

    def stepped() -> bool:
        new = [p for p in runs.glob("cancel_me*") if p not in before] if runs.is_dir() else []
        log = new[0] / "log.jsonl" if new else None
        return bool(log and log.is_file() and len(log.read_text().splitlines()) >= 2)

    pid = _queue(server, train)
    _interrupt_when(server, stepped)
    entry = _finished(server, pid)
    stopped = _interrupted_in(entry)
    assert stopped == "FT_TrainLoRA", entry["status"]["messages"]
    (run,) = [p for p in runs.glob("cancel_me*") if p not in before]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "cancelled" and status["step"] >= 2, status
    assert (run / "checkpoints" / f"step-{status['step']}" / "manifest.json").is_file()

    sample = {"1": prompt["1"], "5": {**prompt["5"], "inputs": {**prompt["5"]["inputs"], "model": ["1", 0],
                                                                 "steps": 500, "batch_size": 16}},
              "8": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
    started = time.time()
    pid = _queue(server, sample)
    _interrupt_when(server, lambda: time.time() - started > 2)
    entry = _finished(server, pid)
    assert _interrupted_in(entry) == "FT_Sample", entry["status"]["messages"]
