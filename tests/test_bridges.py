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
