"""Every saved file is read back before anyone shares it (nodes/load_check.py). Outside ComfyUI the pack's own reader
reads it back and every tensor must be what was saved; inside ComfyUI its own loaders do (tests/test_comfyui.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """A toy LoRA and embedding trained two steps, with the training nodes' outputs."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA, FT_TrainTextualInversion

    saved = dict(host._fallback)
    root = tmp_path_factory.mktemp("load_check")
    host.set_folders(output=root / "output", models=root / "models")
    try:
        ds = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0]
        lora_out = FT_TrainLoRA().execute(toy, ds, steps=2, batch_size=2, run_name="lc-lora")
        ti_out = FT_TrainTextualInversion().execute(toy, ds, token="<q>", init_token="star", num_vectors=2, caption_mode="object templates",
                                                    steps=2, batch_size=2, run_name="lc-ti")
        yield root, lora_out, ti_out
    finally:
        host._fallback.update(saved)


def test_save_nodes_say_what_read_their_file_back(trained, folders):
    from comfyui_finetune.nodes.io import FT_SaveEmbedding, FT_SaveLoRA

    _, (_, lora, _), (_, emb, _) = trained
    text = FT_SaveLoRA().execute(lora, "lc/lora")["ui"]["text"]
    n = len(lora.state)
    assert text == ["saved loras/lc/lora.safetensors", f"checked by the pack's reader: {n} of {n} keys applied"]
    text = FT_SaveEmbedding().execute(emb, "lc/emb")["ui"]["text"][1]
    assert text == "checked by the pack's reader: 1 of 1 tensors applied", text


def test_a_file_that_reads_back_otherwise_is_named_key_by_key_and_kept(trained, tmp_path):
    from comfyui_finetune.nodes import load_check
    from comfyui_finetune.trainers.runs.export import lora_metadata, save_unique

    _, (_, lora, _), _ = trained
    path = save_unique(tmp_path, "lora", lora.state, lora_metadata(lora))
    first, second = sorted(lora.state)[:2]
    changed = dataclasses.replace(lora, state={**lora.state, first: lora.state[first] + 1,
                                               "lora_unet_nowhere.alpha": torch.tensor(1.0)})
    with pytest.raises(load_check.NotApplied) as e:
        load_check.check_lora(path, changed)
    msg = str(e.value)
    assert f"would ignore 2 of its {len(lora.state) + 1} keys: {first}, lora_unet_nowhere.alpha." in msg
    assert second not in msg and "kept at" in msg and path.is_file()


def test_the_run_folders_result_files_are_checked_too(trained):
    from comfyui_finetune.nodes import load_check
    from comfyui_finetune.nodes.train import check_results

    root, lora_out, ti_out = trained
    for out, stem, unit in ((lora_out, "lora", "keys"), (ti_out, "embedding", "tensors")):
        folder = root / "output" / "finetune" / out[2].run
        (got,) = check_results(out, folder)
        assert str(got).startswith("checked by the pack's reader: ") and got.applied == got.total > 0, got
        value = out[1]
        broken = (dataclasses.replace(value, state={k: v * 2 for k, v in value.state.items()}) if stem == "lora"
                  else dataclasses.replace(value, vectors=value.vectors * 2))
        with pytest.raises(load_check.NotApplied, match=f"{stem}.safetensors was written, but the pack's reader"):
            check_results((out[0], broken, out[2]), folder)


def test_the_comfyui_family_of_a_file(trained):
    from comfyui_finetune.nodes import load_check
    from comfyui_finetune.trainers.families import registry
    from comfyui_finetune.trainers.families.registry import FAMILIES

    _, (_, lora, _), (_, emb, _) = trained
    assert registry.family_of_lora(lora) is FAMILIES["toy"]
    assert registry.family_of_embedding(emb) is FAMILIES["toy"]
    bare = dataclasses.replace(emb, metadata={}, vectors=torch.zeros(1, 768))
    assert registry.family_of_embedding(bare) is FAMILIES["sd15"]
    assert registry.family_of_embedding(dataclasses.replace(bare, vectors_2=torch.zeros(1, 1280))) \
        is FAMILIES["sdxl"]
    assert load_check.comfy_family(FAMILIES["sd15"]) == (False, "")  # not inside ComfyUI: the pack's reader


def test_skeleton_has_every_single_file_key_and_allocates_nothing():
    from comfyui_finetune.trainers.families.registry import FAMILIES
    from comfyui_finetune.trainers.model.checkpoint import skeleton_state

    state = skeleton_state(FAMILIES["sd15"])
    assert len(state) == 1130 and {v.device.type for v in state.values()} == {"meta"}
    assert tuple(state["model.diffusion_model.input_blocks.0.0.weight"].shape) == (320, 4, 3, 3)


def test_a_diffusers_folder_is_read_back_part_by_part(toy, folders):
    """Save Checkpoint's diffusers folder: every tensor of every part read back as saved (in the saved precision);
    a tensor changed on disk afterwards is named with its part."""
    from safetensors.torch import load_file, save_file

    from comfyui_finetune.nodes import load_check
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint

    out = FT_SaveCheckpoint().execute(toy, "lc/toy_folder", "diffusers folder", "fp16")
    name = out["result"][0]
    total = sum(len(p.state_dict()) for p in toy.parts().values())
    assert out["ui"]["text"][1] == f"checked by the pack's reader: {total} of {total} tensors applied", out["ui"]
    folder = folders["models"] / "diffusers" / name
    (file,) = (folder / "unet").glob("*.safetensors")
    state = load_file(str(file))
    key = sorted(state)[0]
    state[key] = state[key] + 1
    save_file(state, str(file))
    with pytest.raises(load_check.NotApplied, match=f"unet/{key}"):
        load_check.check_folder(folder, toy, torch.float16)
