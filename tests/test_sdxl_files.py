"""SDXL's files, on a random model with SDXL's exact block layout at narrow widths (tests/random_models.py): the
single-file checkpoint (``model.diffusion_model.*`` with ``label_emb``, ``conditioner.embedders.0/1.*``,
``first_stage_model.*``) round-trips bit-exact through diffusers' own single-file converters, its v-prediction and
zero-SNR markers are ComfyUI's, and a LoRA the pack saves under kohya's SDXL names is read by diffusers'
``StableDiffusionXLPipeline.load_lora_weights`` into the very outputs the pack computes. The same files at full size
in ComfyUI: tests/test_comfyui_sdxl.py."""
from __future__ import annotations

import pytest
import torch

from random_models import TOY_TOKENIZER, mini_sdxl_config, random_model


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    cfg = mini_sdxl_config(tmp_path_factory.mktemp("sdxl") / "config")
    return cfg, random_model("sdxl", TOY_TOKENIZER, cfg)


def test_an_sdxl_single_file_round_trips_bit_exact_with_the_original_names(mini):
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.families.registry import family_for_checkpoint
    from comfyui_finetune.trainers.model.loading import model_from_single_file_state

    cfg, model = mini
    state = to_single_file(model, torch.float32)
    for key in ("model.diffusion_model.label_emb.0.0.weight",  # the pooled text + time-id embedding
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",  # level 1's 2nd
                "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",  # level 2's 10th
                "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",  # the upsampler after two cross-attn blocks
                "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "first_stage_model.decoder.up.3.block.2.conv2.weight"):
        assert key in state, key
    assert not any(k.startswith("cond_stage_model.") for k in state)
    proj = model.text_encoder_2.text_projection.weight
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], proj.t())  # OpenCLIP's x @ P
    assert family_for_checkpoint({k: tuple(v.shape) for k, v in state.items()}).name == "sdxl"
    n = len(state)
    back = model_from_single_file_state(dict(state), "back", TOY_TOKENIZER, "cpu", "fp32", config_dir=cfg)
    assert back.family.name == "sdxl" and back.prediction_type == "epsilon" and back.native_size == 1024
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(back, part).state_dict(), getattr(model, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in b), part
    assert len(to_single_file(back, torch.float32)) == n


def test_v_prediction_and_zero_snr_travel_as_comfyuis_markers(mini):
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.model.loading import model_from_single_file_state, set_prediction

    cfg, model = mini
    v = model.share()
    set_prediction(v, "v_prediction")
    v.scheduler_config["rescale_betas_zero_snr"] = True
    state = to_single_file(v, torch.float32)
    assert state["v_pred"].numel() == 0 and state["ztsnr"].numel() == 0  # what ComfyUI's CheckpointSave writes
    back = model_from_single_file_state(dict(state), "v", TOY_TOKENIZER, "cpu", "fp32", config_dir=cfg)
    assert back.prediction_type == "v_prediction" and back.scheduler_config["rescale_betas_zero_snr"]
    assert back.prediction_source == "detected from the weights"
    forced = model_from_single_file_state(dict(state), "e", TOY_TOKENIZER, "cpu", "fp32", "epsilon", config_dir=cfg)
    assert forced.prediction_type == "epsilon" and forced.prediction_source == "set by the prediction input"
    plain = to_single_file(model, torch.float32)
    assert "v_pred" not in plain and "ztsnr" not in plain


def test_what_is_not_an_sdxl_base_is_refused_by_name():
    from comfyui_finetune.trainers.families.registry import family_for_checkpoint

    attn = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    refiner = {attn: (768, 1280), "conditioner.embedders.0.model.text_projection": (1280, 1280)}
    with pytest.raises(ValueError, match="SDXL refiner"):
        family_for_checkpoint(refiner)
    edm = {attn: (640, 2048), "conditioner.embedders.1.model.positional_embedding": (77, 1280),
           "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
           "edm_mean": (1, 4, 1, 1)}
    with pytest.raises(ValueError, match="EDM"):
        family_for_checkpoint(edm)
    del edm["edm_mean"]
    assert family_for_checkpoint(edm).name == "sdxl"
    assert family_for_checkpoint({attn: (640, 2048)}).name == "sdxl"  # a UNet alone (ComfyUI's MODEL)
    wrong_place = {attn: (640, 2048), "cond_stage_model.transformer.text_model.x": (1,)}
    with pytest.raises(ValueError, match="cross-attention width 2048"):
        family_for_checkpoint(wrong_place)


def test_diffusers_load_lora_weights_reads_the_packs_sdxl_lora_into_the_same_outputs(mini, tmp_path):
    """diffusers converts kohya's SDXL names (``lora_unet_input_blocks_4_1_...``, ``lora_te1_``, ``lora_te2_``) by
    SDXL's block layout; on that layout its UNet and both encoders compute what the pack trained, every module
    matched."""
    from safetensors.torch import save_file

    from test_adapter_kinds import random_adapter

    _, base = mini
    model = base.share()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    ctx = torch.randn(2, 77, 2048, generator=g)  # the mini encoders are narrow: the UNet gets SDXL's width
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    ids = base.tokenizer(["a sks star", "a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs(unet, te, te2):
        with torch.no_grad():
            return (unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample,
                    te(ids, output_hidden_states=True).hidden_states[-2],
                    te2(ids, output_hidden_states=True).text_embeds)

    with torch.inference_mode(False):
        method, _ = random_adapter(model, 2.0)
        want = outputs(model.unet, model.text_encoder, model.text_encoder_2)
        lora = method.result("xl", {})
    save_file(lora.state, str(tmp_path / "xl.safetensors"), metadata=lora.metadata)
    pipe = base.clone().to_pipeline()
    pipe.load_lora_weights(str(tmp_path / "xl.safetensors"))
    adapted = sum(1 for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for mod in m.modules()
                  if hasattr(mod, "lora_A") and len(mod.lora_A))
    assert adapted == len(lora.modules()), f"diffusers matched {adapted} of {len(lora.modules())} modules"
    got = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    plain = outputs(base.unet, base.text_encoder, base.text_encoder_2)
    for name, w, gt, p in zip(("unet", "text_encoder", "text_encoder_2"), want, got, plain):
        assert float((w - p).abs().max()) > 1e-2, f"{name}: the LoRA changes nothing"
        assert torch.allclose(gt, w, atol=1e-5), f"{name}: diffusers differs by {float((gt - w).abs().max())}"


def test_an_fp16_sdxl_keeps_its_vae_in_fp32(mini):
    """SDXL's VAE overflows in fp16 (force_upcast in its config): beside an fp16 model it stays fp32, and pictures
    go in and latents come out in the right precisions."""
    from comfyui_finetune.trainers.sampling import decode

    _, base = mini
    half = base.share().to("cpu", torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32 and half.part_dtype("vae") == torch.float32
    img = decode(half, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()
    assert base.share().to("cpu", torch.bfloat16).vae.dtype == torch.bfloat16  # bf16 does not overflow


@pytest.mark.parametrize("lent,dtype,inference", [("fp32", "fp32", False), ("bf16", "bf16", False),
                                                  ("fp32", "fp32", True), ("bf16", "bf16", True),
                                                  ("bf16", "fp32", True)])
def test_a_borrowed_state_is_built_into_weights_of_the_models_own(mini, lent, dtype, inference):
    """Model from ComfyUI builds the pack's model from ComfyUI's live weights (``borrowed``): the model keeps none of
    them (ComfyUI patches and restores its weights in place), whatever the conversion would have shared, and
    ComfyUI's inference tensors (it loads its models in inference mode) become trainable weights. Without
    ``borrowed`` (a file's tensors, the pack's to keep) the build shares them: what the test looks for is there."""
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.model.loading import model_from_single_file_state

    cfg, model = mini
    lender = to_single_file(model, torch.float32 if lent == "fp32" else torch.bfloat16)
    if inference:
        with torch.inference_mode():
            lender = {k: v.clone() for k, v in lender.items()}
    storages = {v.untyped_storage().data_ptr() for v in lender.values()}

    def shared(m):
        return [f"{name}.{k}" for name, part in m.parts().items() for k, t in
                [*part.named_parameters(), *part.named_buffers()] if t.untyped_storage().data_ptr() in storages]

    if not inference and lent == dtype:
        kept = model_from_single_file_state(dict(lender), "kept", TOY_TOKENIZER, "cpu", dtype, config_dir=cfg)
        assert len(shared(kept)) > 100  # a file's tensors become the model's weights, no copy
    own = model_from_single_file_state(dict(lender), "own", TOY_TOKENIZER, "cpu", dtype, config_dir=cfg,
                                       borrowed=True)
    assert shared(own) == []
    assert not any(t.is_inference() for part in own.parts().values() for t in part.parameters())
    rounded = {"fp32": torch.float32, "bf16": torch.bfloat16}[lent]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the lender's values all the same
        a, b = getattr(own, part).state_dict(), getattr(model, part).state_dict()
        assert all(torch.equal(a[k], b[k].to(rounded).to(a[k].dtype) if b[k].is_floating_point() else b[k])
                   for k in b), part


def test_the_pooled_embedding_is_the_end_of_texts_with_a_new_token_in_the_prompt(mini):
    """configs/sdxl's text encoders say eos_token_id 2, as SDXL's published configs do, for which transformers pools
    at the highest token id of the prompt: a Textual Inversion token's (ids past the vocabulary) instead of the end of
    the text. ComfyUI pools at the end of the text (comfy/clip_model.py), and so must the pack, or an SDXL embedding
    trains against a pooled vector it never meets there."""
    from comfyui_finetune.trainers.methods.textual_inversion import add_token

    _, base = mini
    model = base.share()
    widths = [te.get_input_embeddings().weight.shape[1] for te in model.text_encoders]
    add_token(model, "<new>", torch.randn(1, widths[0]), torch.randn(1, widths[1]))
    prompt = "a <new> thing"
    with torch.no_grad():
        got = model.encode_prompts([prompt])[0, -1, :model.family.pooled_dim(model)]
        ids = model.tokenize([prompt], model.tokenizer_2)
        hidden = model.text_encoder_2(ids).last_hidden_state[0]
        end = int((ids[0] == model.tokenizer_2.eos_token_id).nonzero()[0])
        assert int(ids[0].argmax()) != end  # the new token's id is the prompt's highest
        want = model.text_encoder_2.text_projection(hidden[end])
    assert model.text_encoder_2.config.eos_token_id == 2 and torch.allclose(got, want, atol=1e-5)


def test_an_offloaded_load_never_puts_a_weight_on_the_gpu(mini, monkeypatch):
    """Load Base Model and Model from ComfyUI with offload auto on a GPU: each part is cast in CPU memory and stays
    there (they put the whole model on the GPU, SDXL's 6.6 GB in fp16, beside ComfyUI's own copy for the bridge, to
    take it off again). Here torch pretends a GPU is there: any weight sent to it raises, as this build has none."""
    from comfyui_finetune.nodes.models import load_base_model
    from comfyui_finetune.trainers.model.checkpoint import to_single_file
    from comfyui_finetune.trainers.model.loading import DTYPES, model_from_single_file_state
    from comfyui_finetune.trainers.toy.loader import TOY_XL_SOURCE

    cfg, model = mini
    state = to_single_file(model, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for m in (model_from_single_file_state(dict(state), "off", TOY_TOKENIZER, "auto", "auto", config_dir=cfg,
                                           borrowed=True, offload=True),
              load_base_model(TOY_XL_SOURCE, "auto", "auto", "auto")):
        assert m.device.type == "cuda" and m.offload
        assert m.dtype == DTYPES[m.family.gpu_dtype]  # auto's dtype on a GPU (SDXL fp16, the toys fp32)
        for name, part in m.parts().items():
            assert {(p.device.type, p.dtype) for p in part.parameters()} == {("cpu", m.part_dtype(name))}, name
    assert model_from_single_file_state(dict(state), "fp16", TOY_TOKENIZER, "auto", "auto", config_dir=cfg,
                                        offload=True).vae.dtype == torch.float32  # SDXL's VAE: fp32 beside fp16
