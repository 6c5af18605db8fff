"""Z-Image's files: the transformer in ComfyUI's native layout (fused qkv) both ways, read by diffusers' own
converter, and Load Z-Image reading the three files ComfyUI holds Z-Image as (a small random transformer and Qwen3 of
the real layouts, the real Flux VAE shape), then sampling and training a LoRA whose file names the transformer's
modules as ComfyUI's Z-Image LoRA loader reads them. (Real-size files in a real ComfyUI: test_comfyui_zimage.py.)"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_finetune.trainers.families.zimage_native import from_native, to_native


def test_the_native_layout_round_trips_and_diffusers_reads_it():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from comfyui_finetune.trainers.toy import models

    torch.manual_seed(0)
    state = models.new_zimage_transformer().state_dict()
    native = to_native(state, "model.diffusion_model.")
    assert "model.diffusion_model.layers.0.attention.qkv.weight" in native
    assert not any(".to_q." in k or "all_x_embedder" in k for k in native)
    unet_loader_file = to_native(state)  # what UNETLoader reads: no prefix (diffusers 0.36's converter wants none)
    for back in (from_native(dict(native), "model.diffusion_model."),
                 convert_z_image_transformer_checkpoint_to_diffusers(dict(unet_loader_file))):
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def zimage_files(tmp_path_factory):
    """A small Z-Image as ComfyUI's three files: the toy's transformer (native layout, bf16), a random 2-layer Qwen3
    (transformers' names under ``model.``, as Comfy-Org's qwen_3_4b file has them) and a random Flux VAE (the real
    shape, original layout); and a Qwen tokenizer folder (the toy's vocabulary; ComfyUI's is the real one)."""
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    from comfyui_finetune.trainers.families.registry import FAMILIES
    from comfyui_finetune.trainers.families.ldm import vae_key
    from comfyui_finetune.trainers.toy.loader import load_toy_zimage_model
    from comfyui_finetune.trainers.toy.tokenizer import write_qwen_tokenizer

    root = tmp_path_factory.mktemp("zimage")
    tok = write_qwen_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    with torch.inference_mode(False):
        # the toy's trained transformer (its layout is what is tested): a freshly initialised one trained into NaN at
        # the LoRA test's second step in the oldest set, its blow-up decided by float rounding
        dit = copy.deepcopy(load_toy_zimage_model().transformer)
        te = Qwen3Model(Qwen3Config(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(FAMILIES["zimage"].config_dir / "vae")))
    files = {"diffusion_models": root / "models" / "diffusion_models" / "z.safetensors",
             "text_encoders": root / "models" / "text_encoders" / "qwen.safetensors",
             "vae": root / "models" / "vae" / "ae.safetensors"}
    for f in files.values():
        f.parent.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in to_native(dit.state_dict()).items()},
              str(files["diffusion_models"]))
    save_file({"model." + k: v.contiguous() for k, v in te.state_dict().items()}, str(files["text_encoders"]))
    n_up = len(vae.config.up_block_types)
    save_file({vae_key(k, n_up): v.contiguous() for k, v in vae.state_dict().items()}, str(files["vae"]))
    return root, tok, {"dit": dit, "te": te, "vae": vae}


def test_load_z_image_reads_comfyuis_three_files(zimage_files, folders, monkeypatch):
    from comfyui_finetune.nodes import models as model_nodes
    from comfyui_finetune.nodes import host
    from comfyui_finetune.trainers.sampling import sample

    from comfyui_finetune.trainers.runs import reading

    root, tok, made = zimage_files
    host.set_folders(models=root / "models")
    monkeypatch.setattr(model_nodes, "qwen_tokenizer_dir", lambda: str(tok))
    monkeypatch.setattr(reading, "GROUP_BYTES", 64 << 10)  # each file read in many groups, as a real one is
    out = model_nodes.FT_LoadZImage().load("z.safetensors", "qwen.safetensors", "ae.safetensors", "cpu", "fp32")
    model = out["result"][0]
    assert "Z-Image" in out["ui"]["text"][0] and model.family.name == "zimage"
    assert model.transformer.config.n_layers == 3 and model.transformer.config.cap_feat_dim == 64
    for name, part in (("dit", model.transformer), ("te", model.text_encoder), ("vae", model.vae)):
        want = made[name].state_dict()
        got = part.state_dict()
        assert got.keys() == want.keys(), name
        cast = (lambda t: t.to(torch.bfloat16).float()) if name == "dit" else (lambda t: t)
        assert all(torch.equal(got[k], cast(want[k])) for k in want), name
    assert model.latent_format.scale == pytest.approx(0.3611) and model.latent_format.shift == pytest.approx(0.1159)
    with torch.inference_mode(False):
        img = sample(model, "a red circle", seeds=[0], steps=2, width=64, height=64)
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def test_z_image_turbo_by_its_file_name_samples_unguided_under_auto(zimage_files, folders, monkeypatch):
    """cfg 0 (auto) is the model's own guidance: Z-Image Base's 5 (its family's), Turbo's 1 (distilled to draw
    without guidance), told apart by the file's name as ComfyUI's users name it; a shared copy keeps it."""
    import os

    from comfyui_finetune.nodes import models as model_nodes
    from comfyui_finetune.nodes import host
    from comfyui_finetune.trainers.sampling import sample

    root, tok, _ = zimage_files
    host.set_folders(models=root / "models")
    monkeypatch.setattr(model_nodes, "qwen_tokenizer_dir", lambda: str(tok))
    dit = root / "models" / "diffusion_models"
    os.link(dit / "z.safetensors", dit / "z_image_turbo_bf16.safetensors")  # the same weights, Turbo's name
    load = model_nodes.FT_LoadZImage().load
    try:
        base = load("z.safetensors", "qwen.safetensors", "ae.safetensors", "cpu", "fp32")["result"][0]
        turbo = load("z_image_turbo_bf16.safetensors", "qwen.safetensors", "ae.safetensors", "cpu", "fp32")["result"][0]
    finally:
        os.unlink(dit / "z_image_turbo_bf16.safetensors")
    assert base.guidance(0) == 5.0 and turbo.guidance(0) == 1.0 and turbo.guidance(3.5) == 3.5
    assert turbo.share().guidance(0) == 1.0
    with torch.inference_mode(False):
        draw = lambda cfg: sample(turbo, "a red circle", seeds=[0], steps=2, width=64, height=64, cfg=cfg)
        auto_, one, five = draw(0.0), draw(1.0), draw(5.0)
    assert torch.equal(auto_, one) and (auto_ - five).abs().max() > 1e-3


def test_a_lora_trained_on_z_image_names_its_modules_as_comfyui_reads_them(zimage_files, folders, monkeypatch):
    from comfyui_finetune.nodes import models as model_nodes
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.io import FT_SaveLoRA
    from comfyui_finetune.nodes.train import FT_TrainLoRA

    root, tok, _ = zimage_files
    host.set_folders(models=root / "models")
    monkeypatch.setattr(model_nodes, "qwen_tokenizer_dir", lambda: str(tok))
    (model,) = model_nodes.FT_LoadZImage().execute("z.safetensors", "qwen.safetensors", "ae.safetensors", "cpu", "fp32")
    # at 64 px: Z-Image's native 1024 px made each step encode two 1024 px pictures (126 s of CI), and the names
    # do not depend on the size
    ds = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0].with_options(resolution=64)
    with torch.inference_mode(False):
        _, lora, log = FT_TrainLoRA().execute(model, ds, steps=2, batch_size=2, rank=4, alpha=4.0, seed=0,
                                              run_name="zi")
    assert lora.state and all(k.startswith("diffusion_model.") for k in lora.state)
    assert "diffusion_model.layers.0.attention.to_q.lora_down.weight" in lora.state
    (name,) = FT_SaveLoRA().execute(lora, "zimage/mini")["result"]
    from safetensors import safe_open

    with safe_open(str(root / "models" / "loras" / name), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "zimage"
    assert json.loads(meta["finetune_config"])["recipe"]["snr_gamma"] == 0.0


def test_a_whole_z_image_checkpoint_is_comfyuis_layout_and_reads_back_every_tensor(zimage_files, folders, monkeypatch):
    """The whole-checkpoint layout ComfyUI's CheckpointSave writes for Z-Image (what the bridges hand ComfyUI and take
    back): the transformer native under model.diffusion_model., the Qwen3 under text_encoders.qwen3_4b.transformer.
    model., the VAE under vae.; read back part by part with every tensor equal, a LoRA's change merged in."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes import models as model_nodes
    from comfyui_finetune.trainers.config.recipes import LoRARecipe
    from comfyui_finetune.trainers.methods.lora import LoRAMethod, attach_lora
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.model.deltas import plain_state_dict
    from comfyui_finetune.trainers.model.zimage_files import zimage_from_states

    root, tok, _ = zimage_files
    host.set_folders(models=root / "models")
    monkeypatch.setattr(model_nodes, "qwen_tokenizer_dir", lambda: str(tok))
    (model,) = model_nodes.FT_LoadZImage().execute("z.safetensors", "qwen.safetensors", "ae.safetensors", "cpu", "fp32")
    with torch.inference_mode(False):
        method = LoRAMethod(4, 4.0, "attention")
        method.setup(model.share())
        for grp in method.param_groups(LoRARecipe()):
            for p in grp["params"]:
                torch.nn.init.normal_(p, std=0.05)
        work = attach_lora(model.share(), method.result("probe", {}), 1.0)  # applied live, as Apply LoRA does
    state = to_single_file(work, torch.float32)
    assert {k.split(".")[0] for k in state} == {"model", "text_encoders", "vae"}
    assert "model.diffusion_model.layers.0.attention.qkv.weight" in state
    assert "text_encoders.qwen3_4b.transformer.model.layers.1.mlp.up_proj.weight" in state
    assert "vae.decoder.up_blocks.0.resnets.0.norm1.weight" in state
    back = zimage_from_states(state, state, state, "whole", str(tok), "cpu", "fp32")
    merged = plain_state_dict(work.transformer)
    assert not torch.equal(merged["layers.0.attention.to_q.weight"],
                           model.transformer.state_dict()["layers.0.attention.to_q.weight"]), "the LoRA must move it"
    for name, got, want in (("transformer", back.transformer.state_dict(), merged),
                            ("text_encoder", back.text_encoder.state_dict(), model.text_encoder.state_dict()),
                            ("vae", back.vae.state_dict(), model.vae.state_dict())):
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_load_base_model_reads_a_whole_z_image_checkpoint(zimage_files, folders, monkeypatch):
    """A whole Z-Image in models/checkpoints (ComfyUI's CheckpointSave layout, what Model to ComfyUI -> Save
    Checkpoint writes) loads in Load Base Model, a part at a time, with every tensor as saved; one without its VAE is
    refused naming what is missing."""
    from safetensors.torch import save_file

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes import models as model_nodes
    from comfyui_finetune.trainers.model.checkpoint import to_single_file

    root, tok, _ = zimage_files
    host.set_folders(models=root / "models")
    monkeypatch.setattr(model_nodes, "qwen_tokenizer_dir", lambda: str(tok))
    monkeypatch.setattr(model_nodes, "comfy_tokenizer_dir", lambda folder: str(tok) if "qwen" in folder else None)
    (model,) = model_nodes.FT_LoadZImage().execute("z.safetensors", "qwen.safetensors", "ae.safetensors", "cpu", "fp32")
    state = to_single_file(model, torch.float32)
    (root / "models" / "checkpoints").mkdir(exist_ok=True)
    save_file(state, str(root / "models" / "checkpoints" / "whole-zimage.safetensors"))
    out = model_nodes.FT_LoadBaseModel().load("checkpoints/whole-zimage.safetensors", "cpu", "fp32")
    back = out["result"][0]
    assert back.family.name == "zimage" and "Z-Image" in out["ui"]["text"][0]
    for name, got, want in (("transformer", back.transformer, model.transformer),
                            ("text_encoder", back.text_encoder, model.text_encoder), ("vae", back.vae, model.vae)):
        got, want = got.state_dict(), want.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    save_file({k: v for k, v in state.items() if not k.startswith("vae.")},
              str(root / "models" / "checkpoints" / "no-vae.safetensors"))
    with pytest.raises(ValueError, match="no-vae.safetensors: a Z-Image checkpoint holds the transformer, the Qwen3 "
                                         "text encoder and the VAE; this one has no vae"):
        model_nodes.FT_LoadBaseModel().execute("checkpoints/no-vae.safetensors", "cpu", "fp32")


def test_a_part_is_copied_from_its_file_a_group_at_a_time_and_every_weight_checked(tmp_path):
    """Load Z-Image reads each file a group of tensors at a time into the module made from it (never the whole file
    beside the module); every weight must come from the file once, and nothing may be left over."""
    from transformers import Qwen3Config, Qwen3Model

    from comfyui_finetune.trainers.model.zimage_files import _fill, _te_names
    from comfyui_finetune.trainers.runs.reading import FileTensors, read

    def qwen():
        return Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16))

    torch.manual_seed(0)
    made = qwen()
    state = {"model." + k: v.contiguous() for k, v in made.state_dict().items()}
    save_file(state, str(tmp_path / "q.safetensors"))
    part = FileTensors(tmp_path / "q.safetensors", "text encoder", group_bytes=1)
    groups = list(part.groups())
    assert len(groups) == len(state) and {k for g in groups for k in g} == set(state)
    assert {k: t.shape for k, t in part.meta().items()} == {k: t.shape for k, t in state.items()}
    assert all(t.device.type == "meta" for t in part.meta().values())
    torch.manual_seed(1)
    into = qwen()
    _fill(into, part, _te_names(part.meta()), "text encoder q.safetensors")
    assert all(torch.equal(into.state_dict()[k], v) for k, v in made.state_dict().items())
    assert read(tmp_path / "q.safetensors")[0].keys() == state.keys()

    short = dict(state)
    short.pop("model.norm.weight")
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"short: 1 of the model's weights are not in it \(e.g. norm.weight\)"):
        part = FileTensors(tmp_path / "short.safetensors", "text encoder", group_bytes=1)
        _fill(qwen(), part, _te_names(part.meta()), "text encoder short")
    save_file({**state, "model.extra.weight": torch.ones(2)}, str(tmp_path / "more.safetensors"))
    with pytest.raises(ValueError, match=r"more: 1 of its tensors fit no weight .*\(e.g. extra.weight\)"):
        part = FileTensors(tmp_path / "more.safetensors", "text encoder")
        _fill(qwen(), part, _te_names(part.meta()), "text encoder more")
