"""A catalogue of bad and awkward input, straight into the nodes and the shell: each case asserts the error type and
that the message names the input, what was wrong and the fix, or, for awkward files that should load, that they
load right. Nothing refused may leave a torn file or run a pickled payload."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_finetune import NODE_CLASS_MAPPINGS
from comfyui_finetune.nodes import host
from comfyui_finetune.nodes.controlnet import FT_LoadControlNet
from comfyui_finetune.nodes.datasets import FT_LoadImageDataset, FT_ToyDataset
from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_ApplyLoRA, FT_SaveLoRA
from comfyui_finetune.nodes.models import FT_LoadBaseModel
from comfyui_finetune.nodes.sample import FT_Sample
from comfyui_finetune.nodes.train import FT_TrainDreamBooth, FT_TrainLoRA
from comfyui_finetune.trainers.config import recipes as R


def pictures(folder: Path, n: int = 2, ext: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (200, 30 * i, 40)).save(folder / f"p{i}{ext}")
    return folder


def toy_set(n=4, caption="a sks star"):
    return FT_ToyDataset().execute("purple", "star", n, caption, 0, "narrow")[0]


def lora(toy, ds, **kw):
    args = dict(steps=2, learning_rate=1e-3, batch_size=2, rank=4, alpha=4.0, seed=0, target_modules="attention",
                train_text_encoder=False, text_encoder_lr=0.0, run_name="bad")
    args.update(kw)
    return FT_TrainLoRA().execute(toy, ds, **args)


# ------------------------------------------------------------------------------------------ names and paths --
BAD_NAMES = [
    ("../outside", "without '..'"),
    ("a/../../outside", "without '..'"),
    ("/etc", "absolute path"),
    ("..\\..\\windows", "without '..'"),
    ("C:\\Users\\x", "absolute path"),
    ("bad\x00name", "NUL byte"),
    ("x" * 300, "a name part may have 255"),
    ("/".join(["d"] * 600), "a name part may have 255, a path 1024"),
]


@pytest.mark.parametrize("name, message", BAD_NAMES, ids=[f"name{i}" for i in range(len(BAD_NAMES))])
@pytest.mark.parametrize("node", ["dataset folder", "resume_run", "lora_name", "model_name", "save filename"])
def test_every_input_that_names_a_path_refuses_bad_names(node, name, message, toy, folders):
    with pytest.raises(ValueError, match=message):
        if node == "dataset folder":
            FT_LoadImageDataset().execute(name, "a photo", "sks")
        elif node == "resume_run":
            lora(toy, toy_set(), resume_run=name)
        elif node == "lora_name":
            FT_ApplyLoRA().execute(toy, name, 1.0)
        elif node == "model_name":
            FT_LoadBaseModel().execute("checkpoints/" + name)
        else:
            FT_SaveLoRA().execute(lora(toy, toy_set(), steps=1)[1], name)
    assert not list((folders["output"] / "finetune").glob("bad*")) or node == "save filename"


def test_a_symlink_out_of_the_input_folder_is_refused(folders, tmp_path):
    outside = pictures(tmp_path / "elsewhere")
    (folders["input"] / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="folder 'linked' leads outside its folder .* through a symbolic link: copy"):
        FT_LoadImageDataset().execute("linked", "a photo", "sks")
    assert "linked" not in host.input_subfolders(), "a linked folder that leads out is not offered either"


def test_a_symlinked_file_inside_a_dataset_is_refused(folders, tmp_path):
    ds = pictures(folders["input"] / "mixed")
    secret = tmp_path / "secret.txt"
    secret.write_text("a private caption")
    (ds / "p0.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="p0.txt is a link to a file outside the folder; copy the file in"):
        FT_LoadImageDataset().execute("mixed", "a photo", "sks")


def test_links_in_model_folders_are_followed_as_comfyui_does_but_only_safetensors_are_read(folders, tmp_path, toy):
    """Model files are often shared between tools by links; a link is followed, and what it leads to is still read
    only as safetensors (a pickle behind a link never runs)."""
    _, trained, _ = lora(toy, toy_set(), steps=1)
    FT_SaveLoRA().execute(trained, "shared")
    (tmp_path / "far").mkdir()
    (folders["models"] / "loras" / "shared.safetensors").rename(tmp_path / "far" / "shared.safetensors")
    (folders["models"] / "loras" / "far").symlink_to(tmp_path / "far", target_is_directory=True)
    (tuned,) = FT_ApplyLoRA().execute(toy, "far/shared.safetensors", 1.0)
    assert tuned.history[-1]["applied_lora"] == "shared"
    marker = tmp_path / "ran"
    write_pickle_payload(tmp_path / "far" / "evil.safetensors", marker)
    with pytest.raises(Exception):
        FT_ApplyLoRA().execute(toy, "far/evil.safetensors", 1.0)
    assert not marker.exists()


# ----------------------------------------------------------------------------- files of the wrong kind --
def write_pickle_payload(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))


PICKLE_TARGETS = [("loras", "evil.safetensors", "lora"), ("loras", "evil.ckpt", "lora"),
                  ("embeddings", "evil.safetensors", "embedding"), ("embeddings", "evil.pt", "embedding"),
                  ("checkpoints", "evil.safetensors", "checkpoint"), ("checkpoints", "evil.ckpt", "checkpoint"),
                  ("controlnet", "evil.safetensors", "controlnet"), ("controlnet", "evil.pth", "controlnet")]


@pytest.mark.parametrize("kind, filename, node", PICKLE_TARGETS, ids=[f"{k}/{f}" for k, f, _ in PICKLE_TARGETS])
def test_a_pickle_under_any_name_is_refused_and_never_runs(kind, filename, node, toy, folders, tmp_path):
    marker = tmp_path / "payload-ran"
    write_pickle_payload(folders["models"] / kind / filename, marker)
    with pytest.raises(Exception) as e:
        if node == "lora":
            FT_ApplyLoRA().execute(toy, filename, 1.0)
        elif node == "embedding":
            FT_ApplyEmbedding().execute(toy, filename, "<x>")
        elif node == "checkpoint":
            FT_LoadBaseModel().execute(f"checkpoints/{filename}")
        else:
            FT_LoadControlNet().execute(filename)
    assert not marker.exists(), "the pickled payload ran"
    msg = str(e.value)
    assert filename.split(".")[0] in msg or "safetensors" in msg or "header" in msg.lower(), msg


def test_a_file_of_another_kind_is_refused_by_each_loader(toy, folders):
    from safetensors.torch import save_file

    _, trained, _ = lora(toy, toy_set(), steps=1)
    FT_SaveLoRA().execute(trained, "real")
    lora_file = folders["models"] / "loras" / "real.safetensors"
    for kind in ("checkpoints", "controlnet", "embeddings"):
        (folders["models"] / kind).mkdir(parents=True, exist_ok=True)
        (folders["models"] / kind / "lora.safetensors").write_bytes(lora_file.read_bytes())
    with pytest.raises(ValueError, match="not a Stable Diffusion 1.x, 2.x or XL checkpoint"):
        FT_LoadBaseModel().execute("checkpoints/lora.safetensors")
    with pytest.raises(ValueError, match="not a ControlNet"):
        FT_LoadControlNet().execute("lora.safetensors")
    with pytest.raises(ValueError, match="not an embedding file"):
        FT_ApplyEmbedding().execute(toy, "lora.safetensors", "<x>")
    save_file({"emb_params": torch.zeros(1, 64)}, str(folders["models"] / "loras" / "emb.safetensors"))
    with pytest.raises(ValueError, match="not a kohya-layout SD LoRA"):
        FT_ApplyLoRA().execute(toy, "emb.safetensors", 1.0)


# ---------------------------------------------------------------------------------------- pictures --
def test_an_image_bomb_is_refused_by_its_size_not_by_memory(folders):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    folder = folders["input"] / "bomb"
    folder.mkdir()
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)  # 1.6 gigapixels of grey, declared in 13 bytes
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                      + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=r"bomb.png: 40000x40000 is 1600 megapixels, over the limit of 67"):
        FT_LoadImageDataset().execute("bomb", "a photo", "sks")


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16", "1"])
def test_awkward_pictures_load_as_rgb(mode, folders):
    folder = folders["input"] / f"odd{mode.replace(';', '')}"
    folder.mkdir()
    if mode == "I;16":  # built from numbers: Pillow 10.1 cannot convert RGB to I;16
        img = Image.fromarray(np.full((16, 24), 40000, dtype=np.uint16))
    else:
        img = Image.new("RGB", (24, 16), (250, 10, 10)).convert(mode)
    img.save(folder / ("a.jpg" if mode == "CMYK" else "a.png"))
    (ds,) = FT_LoadImageDataset().execute(folder.name, "a photo", "sks")
    img = ds.examples[0].image
    assert img.dtype == np.uint8 and img.shape == (16, 24, 3)


# --------------------------------------------------------------------------------- captions and metadata --
def test_a_latin1_caption_is_read_with_a_warning_naming_the_file(folders, caplog):
    folder = pictures(folders["input"] / "latin", 1)
    (folder / "p0.txt").write_bytes("un café au lait".encode("latin-1"))
    (ds,) = FT_LoadImageDataset().execute("latin", "", "sks")
    assert ds.examples[0].caption == "un café au lait"
    assert "p0.txt is not UTF-8" in caplog.text and "save it as UTF-8" in caplog.text


def test_a_caption_with_a_byte_order_mark_loads_clean(folders):
    folder = pictures(folders["input"] / "bom", 1)
    (folder / "p0.txt").write_bytes("\ufeffa sks dog".encode("utf-8"))
    assert FT_LoadImageDataset().execute("bom", "", "sks")[0].examples[0].caption == "a sks dog"


def test_bytes_that_are_no_text_are_an_error_naming_the_file(folders):
    folder = pictures(folders["input"] / "binary", 1)
    (folder / "p0.txt").write_bytes(b"\x81\x8d\x8f\x90\x9d")  # undefined in UTF-8 and in Windows-1252
    with pytest.raises(ValueError, match="caption file p0.txt is not text in UTF-8 .* save it as UTF-8"):
        FT_LoadImageDataset().execute("binary", "", "sks")


BAD_METADATA = [
    ("metadata.jsonl", '{"file_name": "p0.png", "text": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ("metadata.jsonl", '["p0.png", "a"]\n', "line 1 is a list, not an object"),
    ("metadata.jsonl", '{"text": "a caption"}\n', "row 1 lacks file_name"),
    ("metadata.jsonl", '{"file_name": "p0.png"}\n', "row 1 lacks text"),
    ("metadata.csv", "file_name,caption_typo\np0.png,a\n", "row 1 lacks text"),
]


@pytest.mark.parametrize("name, body, message", BAD_METADATA, ids=[f"meta{i}" for i in range(len(BAD_METADATA))])
def test_broken_metadata_is_an_error_naming_the_row(name, body, message, folders):
    folder = pictures(folders["input"] / "meta", 1)
    (folder / name).write_text(body)
    with pytest.raises(ValueError, match=message):
        FT_LoadImageDataset().execute("meta", "", "sks")


def test_metadata_naming_a_missing_file_warns(folders, caplog):
    folder = pictures(folders["input"] / "ghost", 1)
    (folder / "metadata.jsonl").write_text('{"file_name": "p0.png", "text": "a"}\n'
                                           '{"file_name": "gone.png", "text": "b"}\n')
    (ds,) = FT_LoadImageDataset().execute("ghost", "", "sks")
    assert len(ds.examples) == 1 and "names 1 file(s) that are not in the folder" in caplog.text
    assert "gone.png" in caplog.text


def test_metadata_with_windows_separators_matches(folders):
    folder = pictures(folders["input"] / "win" / "sub", 1).parent
    (folder / "metadata.jsonl").write_text('{"file_name": "sub\\\\p0.png", "text": "a windows caption"}\n')
    (ds,) = FT_LoadImageDataset().execute("win", "", "sks")
    assert ds.examples[0].caption == "a windows caption"


# ------------------------------------------------------------------------------------------ numbers --
def numeric_fields():
    for method, cls in sorted((m, e.recipe) for m, e in R.METHODS.items()):
        for name, f in cls.options().items():
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                yield method, name, f


NUMERIC = list(numeric_fields())


@pytest.mark.parametrize("method, name, f", NUMERIC, ids=[f"{m}.{n}" for m, n, _ in NUMERIC])
def test_every_numeric_option_refuses_nan_inf_and_out_of_range(method, name, f):
    cls = R.METHODS[method].recipe
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=rf"{name} must be (a finite number|a whole number)"):
            cls(**{name: bad})
    m = f.metadata
    if m["min"] is not None:
        below = m["min"] - (1 if isinstance(f.default, int) else max(abs(m["min"]) * 0.5, 1e-3))
        with pytest.raises(ValueError, match=rf"{name} must be at least"):
            cls(**{name: below})
    if m["max"] is not None:
        with pytest.raises(ValueError, match=rf"{name} must be at most"):
            cls(**{name: m["max"] * 2 + 1})


SAMPLE_BAD = [("steps", 0, "steps must be at least 1"), ("cfg", math.nan, "cfg must be a finite number"),
              ("cfg", -1.0, "cfg must be at least 0"), ("width", 10_000, "width must be at most 4096"),
              ("batch_size", 0, "batch_size must be at least 1"), ("seed", -5, "seed must be at least 0")]


@pytest.mark.parametrize("name, value, message", SAMPLE_BAD, ids=[f"{n}={v}" for n, v, _ in SAMPLE_BAD])
def test_sample_numbers_are_checked_before_sampling(name, value, message, toy):
    args = dict(model=toy, prompt="a red circle", negative_prompt="", seed=0, steps=2, cfg=4.0, sampler="ddim",
                width=0, height=0, batch_size=1)
    args[name] = value
    with pytest.raises(ValueError, match=message):
        FT_Sample().execute(**args)


def test_the_dataset_node_checks_its_numbers(folders):
    pictures(folders["input"] / "nums", 1)
    with pytest.raises(ValueError, match="caption_dropout must be a finite number, got nan"):
        FT_LoadImageDataset().execute("nums", "a", "sks", caption_dropout=math.nan)
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        FT_LoadImageDataset().execute("nums", "a", "sks", repeats=0)


def test_a_rank_larger_than_every_layer_is_refused_and_leaves_no_run(toy, folders):
    with pytest.raises(ValueError, match="rank must be at most 256, got 100000"):
        lora(toy, toy_set(), rank=100_000)
    with pytest.raises(ValueError, match=r"rank 200 is larger than any layer the LoRA adapts: .* rank 64.* at most 64"):
        lora(toy, toy_set(), rank=200, run_name="wide")
    assert not (folders["output"] / "finetune" / "wide").exists(), "a refused run leaves no folder"


def test_dreambooth_with_the_instance_prompt_equal_to_the_class_prompt_is_refused(toy, folders):
    with pytest.raises(ValueError, match="instance_prompt and class_prompt are the same .'a star'.* 'a sks star'"):
        FT_TrainDreamBooth().execute(toy, toy_set(caption="a star"), instance_prompt="a star", class_prompt="a star",
                                     prior_preservation=True, prior_loss_weight=1.0, num_class_images=2, mode="lora",
                                     train_text_encoder=False, steps=1, learning_rate=1e-3, batch_size=1, seed=0,
                                     run_name="same")


# --------------------------------------------------------------------------------------------- resume --
@pytest.fixture(scope="module")
def four_runs(tmp_path_factory, toy):
    """One finished run of each method, in one output folder."""
    from comfyui_finetune.nodes.train import FT_TrainControlNet, FT_TrainTextualInversion

    saved = dict(host._fallback)
    root = tmp_path_factory.mktemp("runs")
    host.set_folders(output=root / "output", models=root / "models", input=root / "input")
    ds = toy_set()
    common = dict(steps=1, batch_size=2, seed=0)
    names = {}
    names["lora"] = lora(toy, ds, run_name="r-lora")[2].run
    names["textual_inversion"] = FT_TrainTextualInversion().execute(
        toy, ds, token="<q>", init_token="star", num_vectors=1, learning_rate=5e-3, caption_mode="object templates",
        run_name="r-ti", **common)[2].run
    names["dreambooth"] = FT_TrainDreamBooth().execute(
        toy, ds, instance_prompt="a sks star", class_prompt="a star", prior_preservation=False,
        prior_loss_weight=1.0, num_class_images=1, mode="lora", train_text_encoder=False, learning_rate=1e-3,
        run_name="r-db", **common)[2].run
    names["controlnet"] = FT_TrainControlNet().execute(toy, ds, preprocessor="canny", learning_rate=1e-3,
                                                       caption_dropout=0.5, run_name="r-cn", **common)[1].run
    yield root, names
    host._fallback.update(saved)


def resume_with(method: str, run: str, toy):
    from comfyui_finetune.nodes.train import FT_TrainControlNet, FT_TrainTextualInversion

    ds, common = toy_set(), dict(steps=2, batch_size=2, seed=0, resume_run=run)
    if method == "lora":
        return lora(toy, ds, **common)
    if method == "textual_inversion":
        return FT_TrainTextualInversion().execute(toy, ds, token="<q>", init_token="star", num_vectors=1,
                                                  learning_rate=5e-3, caption_mode="object templates", **common)
    if method == "dreambooth":
        return FT_TrainDreamBooth().execute(toy, ds, instance_prompt="a sks star", class_prompt="a star",
                                            prior_preservation=False, prior_loss_weight=1.0, num_class_images=1,
                                            mode="lora", train_text_encoder=False, learning_rate=1e-3, **common)
    return FT_TrainControlNet().execute(toy, ds, preprocessor="canny", learning_rate=1e-3, caption_dropout=0.5,
                                        **common)


LABEL = {"lora": "LoRA", "textual_inversion": "Textual Inversion", "dreambooth": "DreamBooth",
         "controlnet": "ControlNet"}
PAIRS = [(a, b) for a in LABEL for b in LABEL if a != b]


@pytest.mark.parametrize("run_method, node_method", PAIRS, ids=[f"{a}-run-with-{b}-node" for a, b in PAIRS])
def test_resuming_a_run_with_another_methods_node_names_both(run_method, node_method, four_runs, toy):
    _, names = four_runs
    with pytest.raises(ValueError, match=rf"was {LABEL[run_method]} on toy; resume it with the "
                                         rf"{LABEL[run_method]} node \(this is the {LABEL[node_method]} node\)"):
        resume_with(node_method, names[run_method], toy)


def test_resuming_with_another_adapter_shape_or_model_names_each_difference(four_runs, toy):
    _, names = four_runs
    with pytest.raises(ValueError, match=r"rank is 4 in the run, 8 here; target_modules is 'attention' in the run, "
                                         r"'attention\+feedforward' here"):
        lora(toy, toy_set(), steps=2, rank=8, target_modules="attention+feedforward", resume_run=names["lora"])
    other = toy.clone()
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=r"the run trained on toy .*weights \w+\), this model is toy"):
        lora(other, toy_set(), steps=2, resume_run=names["lora"])


# ------------------------------------------------------------------------------------ losses and disks --
def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(toy, folders, monkeypatch):
    from comfyui_finetune.trainers.loop.training import Method

    real = Method.loss
    calls = {"n": 0}

    def loss(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(Method, "loss", loss)
    with pytest.raises(FloatingPointError, match=r"the loss became nan at step 3: lower the learning_rate, or train "
                                                 r"in bf16 \(mixed_precision bf16\) or in fp32"):
        lora(toy, toy_set(), steps=5, save_every=2, run_name="nan")
    run = folders["output"] / "finetune" / "nan"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "step 3" in status["error"] and status["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert (run / "checkpoints" / "step-2" / "manifest.json").is_file()


def test_out_of_memory_names_what_to_lower_and_keeps_the_checkpoint(toy, folders, monkeypatch):
    from comfyui_finetune.trainers.loop.training import Method

    real = Method.loss
    calls = {"n": 0}

    def loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(Method, "loss", loss)
    with pytest.raises(torch.OutOfMemoryError) as err:
        lora(toy, toy_set(), steps=5, save_every=2, batch_size=2, run_name="oom")
    msg = str(err.value)
    assert msg.startswith("out of memory at step 3 (batch_size 2, resolution 32, frozen weights float32, "
                          "gradient_checkpointing off (auto))")
    for fix in ("set gradient_checkpointing to on", "batch_size 1 with grad_accum 2 keeps the effective batch of 2",
                "lower the dataset's resolution (now 32)", "resume_run 'oom' continues it"):
        assert fix in msg
    run = folders["output"] / "finetune" / "oom"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == f"OutOfMemoryError: {msg}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]


def test_out_of_memory_making_validation_pictures_says_so_and_keeps_the_checkpoint(toy, folders, monkeypatch):
    """Validation's own advice (its picture count, or none), not the training step's: the steps fitted."""
    from comfyui_finetune.trainers import sampling

    def sample(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sampling, "sample", sample)
    with pytest.raises(torch.OutOfMemoryError) as err:
        lora(toy, toy_set(), steps=5, save_every=2, validation_prompt="a sks star", validation_every=4,
             validation_images=3, run_name="oom-validation")
    msg = str(err.value)
    assert msg.startswith("out of GPU memory making step 4's validation pictures (32 x 32 px): lower "
                          "validation_images (3), or set validation_every 0")
    assert "batch_size" not in msg
    run = folders["output"] / "finetune" / "oom-validation"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_a_full_disk_leaves_the_earlier_checkpoint_whole(toy, folders, monkeypatch):
    from comfyui_finetune.trainers.runs import integrity

    real = integrity.saved_safetensors  # how a checkpoint's tensors are written (then hashed)
    calls = {"n": 0}

    def saved_safetensors(path, tensors):
        calls["n"] += 1
        if calls["n"] >= 2:
            with open(path, "wb") as f:
                f.write(b"partial")  # some bytes got out before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(integrity, "saved_safetensors", saved_safetensors)
    with pytest.raises(OSError, match="the disk is full while writing checkpoint step-4 of run full .the earlier "
                                      "checkpoints are intact.*free some space"):
        lora(toy, toy_set(), steps=4, save_every=2, run_name="full")
    run = folders["output"] / "finetune" / "full"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.undo()
    from safetensors.torch import load_file

    assert load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_a_full_disk_while_saving_a_lora_keeps_the_old_file(toy, folders, monkeypatch):
    import safetensors.torch

    _, trained, _ = lora(toy, toy_set(), steps=1)
    (name,) = FT_SaveLoRA().execute(trained, "keep")["result"]
    path = folders["models"] / "loras" / name
    before = path.read_bytes()

    def full(tensors, p, metadata=None):
        Path(p).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="the disk is full while writing keep_00001.safetensors"):
        FT_SaveLoRA().execute(trained, "keep")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["keep.safetensors"], "no temporary file is left"


def test_files_are_fsynced_before_the_rename_that_publishes_them(monkeypatch, tmp_path):
    from comfyui_finetune.trainers.runs import atomic, export

    events = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "link", lambda a, b: (events.append(("publish", str(b))), real_link(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("publish", str(b))), real_replace(a, b))[1])
    out = export.write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {})
    atomic.write_text(tmp_path / "s.json", "{}")
    kinds = [(k, Path(p).name) for k, p in events]
    first = kinds.index(("publish", "x.safetensors"))
    assert kinds[first - 1][0] == "fsync" and kinds[first - 1][1].endswith(".tmp"), kinds
    assert ("fsync", tmp_path.name) in kinds[first:], "the folder is fsynced after the rename"
    second = kinds.index(("publish", "s.json"))
    assert kinds[second - 1][0] == "fsync" and kinds[second + 1] == ("fsync", tmp_path.name), kinds
    assert out.is_file()


def test_stale_temporary_files_of_a_dead_run_are_cleaned_on_the_next(toy, folders):
    _, _, log = lora(toy, toy_set(), steps=2, save_every=1, run_name="stale")
    run = folders["output"] / "finetune" / log.run
    (run / "checkpoints" / "step-9.tmp").mkdir()
    (run / "checkpoints" / "step-9.tmp" / "trainable.safetensors").write_bytes(b"torn")
    (run / ".status.json.999999.tmp").write_text("{")
    loras = folders["models"] / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / ".old.safetensors.999999.tmp").write_bytes(b"torn")
    lora(toy, toy_set(), steps=3, resume_run=log.run)
    assert not (run / "checkpoints" / "step-9.tmp").exists() and not (run / ".status.json.999999.tmp").exists()
    FT_SaveLoRA().execute(lora(toy, toy_set(), steps=1, run_name="s2")[1], "fresh")
    assert not (loras / ".old.safetensors.999999.tmp").exists()


# ------------------------------------------------------------------------------------------- the shell --
def test_the_shell_names_a_broken_config(tmp_path, capsys):
    from comfyui_finetune.__main__ import main

    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    assert main(["train", str(cfg)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    cfg.write_text(json.dumps({"train": {}, "method": "lora"}))
    assert main(["train", str(cfg)]) == 2
    assert "format is missing" in capsys.readouterr().err


def test_every_node_number_check_names_the_input():
    """Every node that takes numbers checks them the same way (nodes.base.check_numbers)."""
    from comfyui_finetune.nodes.base import check_numbers

    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for sec in ("required", "optional"):
            for inp, s in spec.get(sec, {}).items():
                if s[0] == "FLOAT":
                    with pytest.raises(ValueError, match=f"{inp} must be a finite number"):
                        check_numbers(cls, (), {inp: math.nan})


# ------------------------------------------------------------------------------------- the runner's graphs --
GRAPHS = [
    ({"1": {"class_type": "FT_Nope", "inputs": {}}}, "FT_Nope"),
    ({"1": {"class_type": "FT_Sample", "inputs": {"model": ["2", 0]}},
      "2": {"class_type": "FT_Sample", "inputs": {"model": ["1", 0]}}}, "cycle"),
    ({"1": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}}, "9"),
    ({"1": {"class_type": "FT_LoadBaseModel", "inputs": {"model_name": "toy (built-in)", "device": "cpu",
                                                          "dtype": "auto"}},
      "2": {"class_type": "FT_Sample", "inputs": {"model": ["1", 0], "prompt": "a red circle", "steps": "many"}},
      "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}, "steps"),
    ([1, 2, 3], "a JSON object mapping node ids to nodes"),
]


@pytest.mark.parametrize("graph, named", GRAPHS, ids=["unknown class", "cycle", "missing link", "wrong type", "list"])
def test_the_runner_refuses_broken_graphs_before_running_anything(graph, named, folders):
    from comfyui_finetune import runner

    with pytest.raises(runner.WorkflowError) as e:
        runner.run(graph)
    assert named in str(e.value), str(e.value)
    assert not list(folders["output"].rglob("*.png")), "nothing ran"


def test_a_replacement_stopped_half_way_puts_the_old_checkpoint_back(tmp_path):
    from comfyui_finetune.trainers.runs.atomic import clean_stale

    (tmp_path / "step-4.old").mkdir()
    (tmp_path / "step-4.old" / "manifest.json").write_text("{}")
    (tmp_path / "step-6.old").mkdir()
    (tmp_path / "step-6").mkdir()
    done = clean_stale(tmp_path)
    assert (tmp_path / "step-4" / "manifest.json").is_file() and not (tmp_path / "step-6.old").exists()
    assert sorted(done) == ["step-4.old (put back as step-4)", "step-6.old"]


def test_a_run_of_the_pack_before_recipes_still_resumes(toy, folders):
    """Runs started before config.json had a format keep their checkpoints: they resume, and a wrong node is named."""
    _, _, log = lora(toy, toy_set(), steps=2, run_name="legacy")
    run = folders["output"] / "finetune" / log.run
    (run / "config.json").write_text(json.dumps({"train": {"steps": 2}, "method": "lora", "rank": 4}))
    _, _, resumed = lora(toy, toy_set(), steps=3, resume_run=log.run)
    assert resumed.resumed_from == 2 and resumed.steps == 3
    (run / "config.json").write_text(json.dumps({"train": {}, "method": "textual_inversion"}))
    with pytest.raises(ValueError, match="was Textual Inversion; resume it with the Textual Inversion node"):
        lora(toy, toy_set(), steps=4, resume_run=log.run)
