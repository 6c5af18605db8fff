"""The bridges to ComfyUI's MODEL / CLIP / VAE, as far as they can be checked without ComfyUI (the rest is in
test_comfyui.py, inside a real ComfyUI)."""
from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import comfyui_finetune.nodes as nodes_pkg
import pytest
from comfyui_finetune.nodes import bridges, host

BRIDGES = {"FT_ApplyLoRAToComfy", "FT_ModelFromComfy", "FT_ModelToComfy"}


def test_bridges_are_registered_only_inside_comfyui(monkeypatch):
    assert not host.in_comfyui()
    assert not BRIDGES & set(nodes_pkg.NODE_CLASS_MAPPINGS)
    monkeypatch.setattr(host, "in_comfyui", lambda: True)
    try:
        inside = importlib.reload(nodes_pkg)
        assert BRIDGES <= set(inside.NODE_CLASS_MAPPINGS)
        names = {inside.NODE_DISPLAY_NAME_MAPPINGS[n] for n in BRIDGES}
        assert names == {"Apply LoRA to ComfyUI Model (finetune)", "Model from ComfyUI (finetune)",
                         "Model to ComfyUI (finetune)"}
    finally:
        monkeypatch.undo()
        importlib.reload(nodes_pkg)
    assert not BRIDGES & set(nodes_pkg.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", sorted(BRIDGES))
def test_bridge_schema_says_it_needs_comfyui(name):
    cls = getattr(bridges, name)
    assert "only inside ComfyUI" in cls.DESCRIPTION
    spec = cls.INPUT_TYPES()
    assert cls.CATEGORY == "finetune/bridges" and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    for value in spec["required"].values():
        assert value[1]["tooltip"]


def test_lora_strengths_have_comfyuis_range():
    req = bridges.FT_ApplyLoRAToComfy.INPUT_TYPES()["required"]
    for name in ("strength_model", "strength_clip"):
        opts = req[name][1]
        assert (opts["min"], opts["max"], opts["step"], opts["default"]) == (-100.0, 100.0, 0.01, 1.0)
    with pytest.raises(ValueError, match="strength_clip must be at most 100"):
        bridges.FT_ApplyLoRAToComfy().execute(None, None, None, 1.0, 101.0)
    with pytest.raises(ValueError, match="full mode"):
        bridges.FT_ApplyLoRAToComfy().execute(None, None, None, 1.0, 1.0)


#: stand-in state dicts: key names and shapes, which is all the family checks read
SD15 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": SimpleNamespace(
    shape=(320, 768)), "model.diffusion_model.input_blocks.0.0.weight": SimpleNamespace(shape=(320, 4, 3, 3))}


def test_unsupported_family_is_named_with_what_the_pack_supports():
    refiner = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
               SimpleNamespace(shape=(768, 1280)), "conditioner.embedders.0.model.ln_final.weight":
               SimpleNamespace(shape=(1280,))}
    reason = bridges.unsupported_reason(refiner, "SDXLRefiner")
    assert "SDXL refiner" in reason and "Stable Diffusion XL" in reason and "Stable Diffusion 2.x" in reason
    odd = {**SD15, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
           SimpleNamespace(shape=(320, 512))}
    assert "ComfyUI's model is Mystery" in bridges.unsupported_reason(odd, "Mystery")
    assert bridges.unsupported_reason(SD15, "SD15") is None
    assert bridges.unsupported_reason(SDXL, "SDXL") is None  # its label_emb is the pooled text + time ids


#: SDXL's UNet as ComfyUI's MODEL gives it: cross-attention 2048 wide, label_emb taking 1280 + 6 x 256
SDXL = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": SimpleNamespace(
    shape=(640, 2048)), "model.diffusion_model.input_blocks.0.0.weight": SimpleNamespace(shape=(320, 4, 3, 3)),
    "model.diffusion_model.label_emb.0.0.weight": SimpleNamespace(shape=(1280, 2816))}


def test_inpainting_and_unclip_models_are_refused_by_name():
    inpaint = {**SD15, "model.diffusion_model.input_blocks.0.0.weight": SimpleNamespace(shape=(320, 9, 3, 3))}
    assert "9 input channels" in bridges.unsupported_reason(inpaint, "SD15")
    unclip = {**SD15, "model.diffusion_model.label_emb.0.0.weight": SimpleNamespace(shape=(1280, 1024))}
    assert "SD21UnclipH" in bridges.unsupported_reason(unclip, "SD21UnclipH")
    other = {**SDXL, "model.diffusion_model.label_emb.0.0.weight": SimpleNamespace(shape=(1280, 2560))}
    assert "other extra inputs" in bridges.unsupported_reason(other, "SDXLVariant")


def test_the_toy_has_no_comfyui_equivalent(toy):
    with pytest.raises(ValueError, match="no ComfyUI equivalent"):
        bridges.FT_ModelToComfy().execute(toy)


def test_textual_inversion_rows_stay_behind(toy):
    """The single-file conversion is the same for every SD-layout model: the toy's components stand in for an
    SD 1.x model here (ComfyUI's own load of a real one is in test_comfyui.py)."""
    import torch
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.methods.textual_inversion import Embedding, apply_embedding

    as_sd15 = dataclasses.replace(toy, family="sd15")
    width = toy.text_encoder.get_input_embeddings().weight.shape[1]
    with torch.inference_mode(False):
        worded = apply_embedding(as_sd15, Embedding("<ft-word>", torch.randn(2, width)))
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    grown, plain = to_single_file(worded, torch.float32)[key], to_single_file(as_sd15, torch.float32)[key]
    assert grown.shape[0] == plain.shape[0] + 2
    state = bridges.comfy_state(worded)
    assert torch.equal(state[key], plain)
    assert set(state) == set(to_single_file(as_sd15, torch.float32))


# ------------------------------------------------------------------ the ComfyUI versions, against fake_comfy.py --
def _comfy_parts(version: str):
    """A MODEL, CLIP and VAE as each ComfyUI holds them, with a LoRA-like patch on one weight of the model and one
    of the text encoder, and the patched weights every version must hand over."""
    import torch
    import fake_comfy as fc

    torch.manual_seed(0)
    unet, te, vae = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    unet_patch, te_patch = {"weight": torch.ones(2, 3)}, {"bias": torch.full((2,), 0.5)}
    expected = {"model.diffusion_model.weight": unet.weight + 1, "model.diffusion_model.bias": unet.bias,
                "cond_stage_model.weight": te.weight, "cond_stage_model.bias": te.bias + 0.5,
                "first_stage_model.weight": vae.weight, "first_stage_model.bias": vae.bias}
    expected = {k: v.detach().clone() for k, v in expected.items()}
    if version == "0.8":
        model, clip = fc.ModelPatcher08(unet, unet_patch), fc.CLIP(fc.ModelPatcher(te, te_patch), saving_api=False)
    else:
        dynamic = version == "0.38 dynamic VRAM"
        model = fc.ModelPatcher038(unet, unet_patch, dynamic=dynamic)
        clip = fc.CLIP(fc.ModelPatcher(te, te_patch, dynamic=dynamic), saving_api=True)
    return model, clip, fc.VAE(vae), expected


@pytest.mark.parametrize("version", ["0.8", "0.38", "0.38 dynamic VRAM"])
def test_model_from_comfyui_gets_the_patched_checkpoint_from_every_comfyui(monkeypatch, version):
    """What Model from ComfyUI builds on: ComfyUI's CheckpointSave state dict with every patch in, as plain tensors.
    0.38 under Dynamic VRAM refuses force_patch_weights, takes the UNet first in BaseModel.state_dict_for_saving and
    hands patched weights out lazily over the unpatched ones; 0.8 has none of that."""
    import torch
    import fake_comfy as fc

    fc.install(monkeypatch)
    model, clip, vae, expected = _comfy_parts(version)
    state = bridges.comfy_checkpoint(model, clip, vae)
    assert set(state) == set(expected)
    for key, want in expected.items():
        assert type(state[key]) in (torch.Tensor, torch.nn.Parameter) and isinstance(state[key].device, torch.device)
        assert torch.equal(state[key], want), key
    if version == "0.38 dynamic VRAM":  # what the 0.8 way of asking meets there
        with pytest.raises(AssertionError):
            fc.load_models_gpu([model], force_patch_weights=True)
        assert not torch.equal(clip.get_sd()["bias"], expected["cond_stage_model.bias"])  # get_sd is unpatched


def test_a_lazily_patched_weight_is_materialised_not_read_underneath():
    import torch
    import fake_comfy as fc

    module = torch.nn.Linear(2, 2)
    patcher = fc.ModelPatcher(module, {"weight": torch.ones(2, 2)})
    lazy = fc.LazyCastingParam(patcher, "weight", module.weight.detach())
    assert torch.equal(lazy.detach(), module.weight)  # what a plain read (or detach) would take: the unpatched one
    assert torch.equal(bridges.materialized(lazy), module.weight + 1)
    plain = torch.zeros(2)
    assert bridges.materialized(plain) is plain


@pytest.mark.parametrize("assigns", [False, True], ids=["copying loader (0.8)", "assigning loader (0.38)"])
def test_model_to_comfyui_never_shares_a_tensor_with_the_pack_model(monkeypatch, toy, assigns):
    """Under Dynamic VRAM ComfyUI's loader keeps the tensors it is given as its weights: the pack's model must not
    be among them, or a later training step would change ComfyUI's MODEL (and ComfyUI's pinning the pack's)."""
    import torch
    import fake_comfy as fc

    sd = fc.install(monkeypatch, assigns=assigns)
    as_sd15 = dataclasses.replace(toy, family="sd15")
    with pytest.raises(RuntimeError, match="did not recognise"):  # the fake loader recognises nothing
        bridges.FT_ModelToComfy().execute(as_sd15)
    ours = {t.untyped_storage().data_ptr() for part in as_sd15.parts().values()
            for t in [*part.parameters(), *part.buffers()]}
    (given,) = sd.loaded
    assert not {v.untyped_storage().data_ptr() for v in given.values()} & ours
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(given[unet_key], as_sd15.unet.conv_in.weight.to(given[unet_key].dtype))
