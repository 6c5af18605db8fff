"""What a file holds, not only where it lies: LoRAs, embeddings, checkpoints, ControlNets and diffusers folders that
are cut short, are a web page saved under a model's name, hold NaN or infinite values, or lack half of a pair. Each
case asserts the error names the file, what is wrong with it and what to do (issue 36, family 1)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_finetune.nodes.controlnet import FT_LoadControlNet
from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_ApplyLoRA
from comfyui_finetune.nodes.models import FT_LoadBaseModel
from comfyui_finetune.trainers.methods.lora import model_kohya_names
from comfyui_finetune.trainers.runs import reading
from comfyui_finetune.trainers.toy.loader import WEIGHTS

FIX = "download or save it again"
NAN_FIX = "download it again, or use an earlier checkpoint"


def lora_state(toy, kind: str = "lora", n: int = 2) -> dict[str, torch.Tensor]:
    """A kohya-layout file's tensors for ``n`` of the toy's UNet modules (shapes that fit)."""
    names = [k for k, m in model_kohya_names(toy).items() if k.startswith("lora_unet_") and
             isinstance(m, torch.nn.Linear)][:n]
    state = {}
    for name in names:
        out_f, in_f = model_kohya_names(toy)[name].weight.shape
        if kind == "loha":
            state.update({f"{name}.hada_w1_a": torch.randn(out_f, 2) * .01, f"{name}.hada_w1_b": torch.randn(2, in_f),
                          f"{name}.hada_w2_a": torch.randn(out_f, 2) * .01, f"{name}.hada_w2_b": torch.randn(2, in_f)})
        elif kind == "lokr":
            state.update({f"{name}.lokr_w1": torch.randn(1, 1), f"{name}.lokr_w2": torch.randn(out_f, in_f) * .01})
        else:
            state.update({f"{name}.lora_down.weight": torch.randn(2, in_f) * .01,
                          f"{name}.lora_up.weight": torch.randn(out_f, 2) * .01})
        state[f"{name}.alpha"] = torch.tensor(2.0)
    return state


def write(folder: Path, name: str, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / name))
    return folder / name


def cut(path: Path, keep: float = 0.6) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])
    return path


DAMAGE = {
    "cut short": (lambda p: cut(p), "cut short"),
    "a web page": (lambda p: p.write_bytes(b"<!DOCTYPE html><html><head><title>Sign in</title>"), "a web page"),
    "empty": (lambda p: p.write_bytes(b""), "0 bytes long"),
    "only the header size": (lambda p: p.write_bytes(p.read_bytes()[:8]), "8 bytes long"),
}


# ------------------------------------------------------------------------------------------------------ LoRA --
@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_lora_names_the_file_and_says_download_again(toy, folders, damage):
    harm, said = DAMAGE[damage]
    harm(write(folders["models"] / "loras", "style.safetensors", lora_state(toy)))
    with pytest.raises(ValueError) as e:
        FT_ApplyLoRA().execute(toy, "style.safetensors", 1.0)
    msg = str(e.value)
    assert "lora_name 'style.safetensors'" in msg and said in msg and FIX in msg, msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_lora_with_values_that_are_not_numbers_is_refused(toy, folders, value):
    state = lora_state(toy)
    key = sorted(k for k in state if k.endswith("lora_up.weight"))[0]
    state[key][0, 0] = value
    write(folders["models"] / "loras", "diverged.safetensors", state)
    with pytest.raises(ValueError) as e:
        FT_ApplyLoRA().execute(toy, "diverged.safetensors", 1.0)
    msg = str(e.value)
    assert "'diverged.safetensors'" in msg and "NaN or infinite" in msg and "1 of its 6 tensors" in msg
    assert key in msg and NAN_FIX in msg


INCOMPLETE = [("lora", "lora_up.weight", "lora_up.weight"), ("lora", "lora_down.weight", "lora_down.weight"),
              ("loha", "hada_w2_b", "hada_w2_b"), ("lokr", "lokr_w2", "lokr_w2 or lokr_w2_a + lokr_w2_b")]


@pytest.mark.parametrize("kind, drop, named", INCOMPLETE, ids=[f"{k}-{d}" for k, d, _ in INCOMPLETE])
def test_a_lora_missing_half_of_a_pair_names_the_module_and_the_missing_tensor(toy, folders, kind, drop, named):
    state = lora_state(toy, kind)
    module = sorted({k.split(".")[0] for k in state})[1]
    del state[f"{module}.{drop}"]
    write(folders["models"] / "loras", "half.safetensors", state)
    with pytest.raises(ValueError) as e:
        FT_ApplyLoRA().execute(toy, "half.safetensors", 1.0)
    msg = str(e.value)
    assert "half: 1 of its 2 modules are incomplete" in msg and module in msg and f"has no {named}" in msg
    assert FIX in msg


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_whole_loras_of_each_kind_still_apply(toy, folders, kind):
    write(folders["models"] / "loras", f"{kind}.safetensors", lora_state(toy, kind))
    (tuned,) = FT_ApplyLoRA().execute(toy, f"{kind}.safetensors", 1.0)
    assert tuned.history[-1]["applied_lora"] == kind


# ------------------------------------------------------------------------------------------------- embedding --
def test_a_damaged_or_non_finite_embedding_is_named(toy, folders):
    width = toy.text_encoder.get_input_embeddings().weight.shape[1]
    folder = folders["models"] / "embeddings"
    cut(write(folder, "cut.safetensors", {"emb_params": torch.randn(4, width)}), 0.5)
    with pytest.raises(ValueError, match=f"embedding_name 'cut.safetensors' is damaged .*cut short.*{FIX}"):
        FT_ApplyEmbedding().execute(toy, "cut.safetensors", "<x>")
    write(folder, "nan.safetensors", {"emb_params": torch.full((2, width), float("nan"))})
    with pytest.raises(ValueError, match=f"embedding_name 'nan.safetensors' holds NaN or infinite .*{NAN_FIX}"):
        FT_ApplyEmbedding().execute(toy, "nan.safetensors", "<x>")


# ------------------------------------------------------------------------------------------------ checkpoint --
@pytest.mark.parametrize("damage", ["cut short", "a web page"])
def test_a_damaged_checkpoint_file_is_named_before_anything_loads(folders, damage):
    path = write(folders["models"] / "checkpoints", "model.safetensors",
                 {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    DAMAGE[damage][0](path)
    with pytest.raises(ValueError) as e:
        FT_LoadBaseModel().execute("checkpoints/model.safetensors")
    msg = str(e.value)
    assert "checkpoint 'model.safetensors' is damaged or is not a safetensors file" in msg and FIX in msg
    assert DAMAGE[damage][1] in msg


def test_reading_checks_every_tensor_as_it_reads_and_names_the_first(tmp_path):
    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
             "steps": torch.tensor([3])}
    path = write(tmp_path, "w.safetensors", state)
    with pytest.raises(reading.DamagedFile, match=r"checkpoint 'w.safetensors' holds NaN or infinite values in 2 "
                                                  r"of its 4 tensors \(e.g. b\)"):
        reading.read(path, "checkpoint")
    fine = write(tmp_path, "ok.safetensors", {"a": torch.ones(2, dtype=torch.float16), "i": torch.arange(3)})
    tensors, meta = reading.read(fine, "checkpoint")
    assert torch.equal(tensors["i"], torch.arange(3)) and meta == {}
    with pytest.raises(FileNotFoundError):  # a missing file is the caller's message, not "damaged"
        reading.read(tmp_path / "gone.safetensors", "checkpoint")


# ------------------------------------------------------------------------------------------ ControlNet, folders --
def test_a_damaged_or_non_finite_controlnet_is_named(folders):
    folder = folders["models"] / "controlnet" / "edges"
    shutil.copytree(Path(WEIGHTS) / "controlnet", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors, _ = reading.read(weights)
    key = sorted(k for k in tensors if k.endswith(".weight"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=f"ControlNet 'diffusion_pytorch_model.safetensors' holds NaN .*{key}"):
        FT_LoadControlNet().execute("edges/diffusion_pytorch_model.safetensors")
    cut(weights)
    with pytest.raises(ValueError, match=f"ControlNet 'diffusion_pytorch_model.safetensors' is damaged.*{FIX}"):
        FT_LoadControlNet().execute("edges/diffusion_pytorch_model.safetensors")


@pytest.fixture
def toy_folder(folders):
    folder = folders["models"] / "diffusers" / "mine"
    shutil.copytree(Path(WEIGHTS) / "pipeline", folder)
    return folder


def test_a_diffusers_folder_with_a_cut_file_names_the_part_and_the_file(toy_folder):
    (weights,) = list((toy_folder / "vae").glob("*.safetensors"))
    cut(weights)
    with pytest.raises(ValueError) as e:
        FT_LoadBaseModel().execute("diffusers/mine")
    msg = str(e.value)
    assert f"mine/vae: {weights.name!r} is damaged" in msg and "cut short" in msg and FIX in msg, msg


def test_a_diffusers_folder_with_nan_weights_names_the_part(toy_folder):
    (weights,) = list((toy_folder / "unet").glob("*.safetensors"))
    tensors, meta = reading.read(weights)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights), metadata=meta)
    with pytest.raises(ValueError, match=f"mine/unet holds NaN or infinite values in 1 of its .*{NAN_FIX}"):
        FT_LoadBaseModel().execute("diffusers/mine")
