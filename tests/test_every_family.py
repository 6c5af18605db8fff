"""The plumbing every family must get right, as one table: a row per built-in family, so a new family adds a row.

For each family's toy-sized model: its prompt embeddings and conditioning are what the family's own diffusers
pipeline computes; sampling draws what that pipeline draws; a LoRA over the denoiser and every text encoder saved
under the family's kohya names computes what peft trained, and those names start with the family's prefixes; an
embedding learned in every text encoder round-trips through its file; a family without a single-file layout
refuses to write one, by name. The toy (and the toy audio model) are the SD lineage's rows, the toy SDXL's
random-weight twin SDXL's (full-size and mini SD 1.x / 2.x / SDXL files: test_sdxl_files.py, test_comfyui*.py).
"""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.trainers.families.registry import FAMILIES
from comfyui_finetune.trainers.model.model import FTModel


def _random_toy_xl():
    """The toy SDXL's architecture with random weights (no training needed to check the plumbing)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from comfyui_finetune.trainers.toy import models
    from comfyui_finetune.trainers.toy.loader import WEIGHTS, load_toy_model

    toy = load_toy_model()
    tok = str(WEIGHTS / "pipeline" / "tokenizer")
    with torch.inference_mode(False):
        torch.manual_seed(0)
        t = CLIPTokenizer.from_pretrained(tok)
        te = CLIPTextModel(models.text_config(len(t), t.bos_token_id, t.eos_token_id)).eval()
        te2 = CLIPTextModelWithProjection(models.text_config_2(len(t), t.bos_token_id, t.eos_token_id)).eval()
        unet = models.new_unet_xl().eval()
    return FTModel("toy_xl", "random_xl", unet, toy.vae, te, t, dict(toy.scheduler_config), text_encoder_2=te2,
                   tokenizer_2=CLIPTokenizer.from_pretrained(tok))


def _toy():
    from comfyui_finetune.trainers.toy.loader import load_toy_model

    return load_toy_model()


def _toy_audio():
    from comfyui_finetune.trainers.toy.loader import load_toy_audio_model

    return load_toy_audio_model()


def _sd_conditioning(pipe, prompts, x):
    embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds}


def _sdxl_conditioning(pipe, prompts, x):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    f = pipe.vae_scale_factor
    size = (x.shape[-2] * f, x.shape[-1] * f)
    ids = pipe._get_add_time_ids(size, (0, 0), size, torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled,
                                                                   "time_ids": ids.expand(len(prompts), 6)}}


def _toy_zimage():
    from comfyui_finetune.trainers.toy.loader import load_toy_zimage_model

    return load_toy_zimage_model()


def _zimage_conditioning(pipe, prompts, x):
    embeds, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return {"cap_feats": embeds}


#: family -> (its toy-sized model, what its diffusers pipeline conditions the denoiser with)
ROWS = {"toy": (_toy, _sd_conditioning), "toy_xl": (_random_toy_xl, _sdxl_conditioning),
        "toy_audio": (_toy_audio, _sd_conditioning), "toy_zimage": (_toy_zimage, _zimage_conditioning)}


def test_every_built_in_family_has_a_row():
    assert set(ROWS) == {name for name, fam in FAMILIES.items() if not fam.config}, \
        "a family the pack ships a model of needs a row here"
    assert {type(FAMILIES[name]).__name__ for name in ROWS} == {type(f).__name__ for f in FAMILIES.values()}, \
        "every family class has a row"


@pytest.fixture(scope="module", params=sorted(ROWS))
def row(request):
    make, conditioning = ROWS[request.param]
    return make(), conditioning


def pipeline(model):
    pipe = model.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same(got, want, atol=1e-6):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _same(got[k], want[k], atol)
    elif isinstance(want, list):  # Z-Image: one context per prompt, each its own length
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _same(a, b, atol)
    else:
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=atol), \
            float((got.float() - want.float()).abs().max())


def test_the_conditioning_is_the_family_pipelines(row):
    model, conditioning = row
    prompts = ["a red circle", "a sks star on a white background"]
    x = torch.zeros(2, model.latent_channels, 4, 6)
    with torch.no_grad():
        got = model.conditioning(x, model.encode_prompts(prompts))
        want = conditioning(pipeline(model), prompts, x)
    _same(got, want)


def test_sampling_draws_what_the_family_pipeline_draws(row):
    from comfyui_finetune.trainers.sampling import initial_noise, sample

    model, _ = row
    ours = sample(model, ["a blue square"], seeds=[3], steps=6, cfg=4.0, negative_prompt="")
    f, size = model.vae_scale_factor, model.native_size
    # ZImagePipeline's guidance g draws cond + g * (cond - uncond): ComfyUI's (and the pack's) cfg g + 1; its
    # schedule is given as diffusers 0.37+ makes it (0.36 ran sigma down to 0 instead of 1 / steps)
    flow = model.prediction_type == "flow"
    extra = {"sigmas": torch.linspace(1.0, 1.0 / 6, 6).tolist()} if flow else {}
    with torch.no_grad():
        theirs = pipeline(model)("a blue square", negative_prompt="", num_inference_steps=6, **extra,
                                 guidance_scale=3.0 if flow else 4.0,
                                 height=size, width=size, output_type="pt",
                                 latents=initial_noise([3], (model.latent_channels, size // f, size // f))).images
    assert float((ours - theirs.permute(0, 2, 3, 1)).abs().max()) < 2e-3


def test_a_lora_file_of_every_part_computes_what_peft_trained(row):
    from comfyui_finetune.trainers.methods.lora import attach_lora, lora_from_state

    from test_adapter_kinds import random_adapter

    base, _ = row
    model = base.share()
    t, prompts = torch.tensor([100, 700]), ["a sks star", "a cat"]
    with torch.inference_mode(False):
        method, g = random_adapter(model, 2.0)
        x = torch.randn(2, model.latent_channels, 16, 16, generator=g)
        with torch.no_grad():
            want = model.denoise(x, t, model.encode_prompts(prompts))
        lora = method.result("row", {})
    fam = base.family
    prefixes = {fam.lora_prefixes[p] for p in base.parts() if p in fam.lora_prefixes}
    assert {next((p for p in prefixes if m.startswith(p)), m) for m in lora.modules()} == prefixes, \
        "every part, under its prefix"
    tuned = attach_lora(base.share(), lora_from_state(lora.state, "again"), 1.0)
    with torch.no_grad():
        got = tuned.denoise(x, t, tuned.encode_prompts(prompts))
        before = base.denoise(x, t, base.encode_prompts(prompts))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert float((got - before).abs().max()) > 1e-3


def test_an_embedding_in_every_text_encoder_round_trips_through_its_file(row, folders):
    from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_SaveEmbedding
    from comfyui_finetune.trainers.sampling import sample

    from test_textual_inversion import train_ti, yellow_triangles

    base, _ = row
    if "textual_inversion" in dict(base.family.not_yet):
        pytest.skip(f"{base.family.label} refuses Textual Inversion by name (test_zimage.py)")
    init = "tone" if base.family.sound_preset else "triangle"  # a word of the model's own world
    tuned, emb, _ = train_ti(base, yellow_triangles(4), steps=4, num_vectors=2, batch_size=2, init_token=init)
    widths = [te.get_input_embeddings().weight.shape[1] for te in base.text_encoders]
    assert [v.shape for v in (emb.vectors, emb.vectors_2) if v is not None] == [(2, w) for w in widths]
    for te, te0 in zip(tuned.text_encoders, base.text_encoders):
        n = te0.get_input_embeddings().weight.shape[0]
        assert torch.equal(te.get_input_embeddings().weight[:n], te0.get_input_embeddings().weight)
    (name,) = FT_SaveEmbedding().execute(emb, f"{base.family.name}/yt")["result"]
    (applied,) = FT_ApplyEmbedding().execute(base, name, "<yt>")
    with torch.inference_mode(False):
        assert torch.equal(sample(tuned, "a <yt>", seeds=[1], steps=4), sample(applied, "a <yt>", seeds=[1], steps=4))


def test_a_family_without_a_single_file_layout_refuses_one_by_name(row):
    import re

    from comfyui_finetune.trainers.model.checkpoint import to_single_file

    model, _ = row
    if model.family.text_encoder_files or model.family.checkpoint_parts:
        pytest.skip("this family has a single-file layout: test_sdxl_files.py, test_zimage_files.py and "
                    "test_comfyui*.py write and read it")
    with pytest.raises(ValueError, match=re.escape(f"this is the {model.family.label}: save it as a diffusers folder")):
        to_single_file(model)
