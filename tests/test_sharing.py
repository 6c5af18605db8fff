"""No second copy of frozen weights: every training and every applied adapter shares the input model's tensors, and
the input model (what ComfyUI cached) is bit-identical afterwards."""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.trainers.model import deltas
from comfyui_finetune.trainers.config.recipes import ControlNetRecipe, DreamBoothRecipe, LoRARecipe, TextualInversionRecipe
from comfyui_finetune.trainers.runs.run_dir import RunDir


def toy_set(color="purple", shape="star", n=4, caption="a sks star"):
    return FT_ToyDataset().execute(color, shape, n, caption, 0, "narrow")[0]


def snapshot(model) -> dict:
    """Every tensor, flag and mode of ``model``, copied, to compare after."""
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        m = getattr(model, part)
        for k, v in m.state_dict(keep_vars=True).items():
            out[f"{part}.{k}"] = (v.detach().clone(), v.requires_grad, v.data_ptr(), v.device, v.dtype)
        out[f"{part}.training"] = m.training
        out[f"{part}.modules"] = [type(x).__name__ for x in m.modules()]
    out["vocab"] = len(model.tokenizer)
    out["tokens"] = dict(model.token_vectors)
    out["history"] = list(model.history)
    return out


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if isinstance(v, tuple):
            a = after[k]
            assert torch.equal(a[0], v[0]), f"{k} changed value"
            assert a[1:] == v[1:], f"{k} changed flags, storage, device or dtype"
        else:
            assert after[k] == v, f"{k} changed"


def ptrs(module) -> set[int]:
    return {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}


def shared_fraction(part_out, part_in) -> float:
    """The share of ``part_in``'s tensors (by bytes) that ``part_out`` holds without a copy."""
    mine = ptrs(part_out)
    tensors = {t.data_ptr(): t for t in [*part_in.parameters(), *part_in.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return sum(t.numel() * t.element_size() for p, t in tensors.items() if p in mine) / total


def steps(cls, **kw):
    base = dict(steps=3, batch_size=2, learning_rate=1e-3, seed=0)
    base.update(kw)
    return cls(**base)


def run_dir(tmp_path, name):
    return RunDir.create(tmp_path, name)


def test_lora_training_shares_every_frozen_weight_and_leaves_the_input_bit_identical(toy, tmp_path):
    from comfyui_finetune.trainers.methods.lora import train_lora

    before = snapshot(toy)
    with torch.inference_mode(False):
        t = train_lora(steps(LoRARecipe, train_text_encoder=True, target_modules="attention+feedforward+conv"), toy,
                       toy_set(), run_dir(tmp_path, "lora"))
    assert_unchanged(toy, before)
    for part in ("unet", "vae", "text_encoder"):
        assert shared_fraction(getattr(t.model, part), getattr(toy, part)) == 1.0, part
    assert deltas.has_deltas(t.model.unet) and deltas.has_deltas(t.model.text_encoder)
    assert not deltas.has_deltas(toy.unet)


def test_textual_inversion_copies_only_the_embedding_table(toy, tmp_path):
    from comfyui_finetune.trainers.methods.textual_inversion import train_textual_inversion

    before = snapshot(toy)
    with torch.inference_mode(False):
        t = train_textual_inversion(steps(TextualInversionRecipe, token="<sh>", init_token="star",
                                          caption_mode="object templates"), toy, toy_set(), run_dir(tmp_path, "ti"))
    assert_unchanged(toy, before)
    assert shared_fraction(t.model.unet, toy.unet) == 1.0 and shared_fraction(t.model.vae, toy.vae) == 1.0
    table = toy.text_encoder.get_input_embeddings().weight
    assert table.data_ptr() not in ptrs(t.model.text_encoder)  # the grown table is the part that trained
    rest = [p for p in toy.text_encoder.parameters() if p is not table]
    assert all(p.data_ptr() in ptrs(t.model.text_encoder) for p in rest)
    assert len(t.model.tokenizer) == len(toy.tokenizer) + 1


@pytest.mark.parametrize("mode,pivotal", [("lora", True), ("full", False)])
def test_dreambooth_copies_only_what_trains(toy, tmp_path, mode, pivotal):
    from comfyui_finetune.trainers.methods.dreambooth import Subject, train_dreambooth

    ds = toy_set(caption="a <sks> star")
    cls = toy_set(color="yellow", caption="a star")
    subject = Subject(ds, "a <sks> star", "a star", cls)
    before = snapshot(toy)
    recipe = steps(DreamBoothRecipe, mode=mode, pivotal_tuning=pivotal, prior_preservation=True,
                   num_class_images=4, instance_prompt="a <sks> star", class_prompt="a star",
                   learning_rate=1e-3 if mode == "lora" else 1e-4)
    with torch.inference_mode(False):
        t = train_dreambooth(recipe, toy, [subject], run_dir(tmp_path, f"db-{mode}"))
    assert_unchanged(toy, before)
    assert shared_fraction(t.model.vae, toy.vae) == 1.0
    if mode == "full":
        assert shared_fraction(t.model.unet, toy.unet) == 0.0  # the trained UNet is its own
        assert shared_fraction(t.model.text_encoder, toy.text_encoder) == 1.0
        assert any(not torch.equal(a, b) for a, b in zip(t.model.unet.parameters(), toy.unet.parameters()))
    else:
        assert shared_fraction(t.model.unet, toy.unet) == 1.0
        assert deltas.has_deltas(t.model.unet)


def test_controlnet_training_shares_the_whole_model(toy, tmp_path):
    from comfyui_finetune.trainers.methods.controlnet import train_controlnet

    before = snapshot(toy)
    with torch.inference_mode(False):
        t = train_controlnet(steps(ControlNetRecipe, low_threshold=0.1, high_threshold=0.2), toy, toy_set(),
                             run_dir(tmp_path, "cn"))
    assert_unchanged(toy, before)
    assert t.model is toy  # a ControlNet changes nothing in the model: the input itself is handed on
    cn = ptrs(t.result.net)
    assert not cn & ptrs(toy.unet), "the ControlNet trains weights of its own"


def test_a_chain_of_applied_loras_shares_the_base_and_equals_merging(toy, tmp_path):
    from comfyui_finetune.trainers.methods.lora import LoRA, apply_lora, lora_delta
    from comfyui_finetune.trainers.methods.textual_inversion import Embedding, apply_embedding

    g = torch.Generator().manual_seed(0)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    w_conv = toy.unet.down_blocks[0].resnets[0].conv1.weight
    w_q = toy.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight

    def lora(name):
        st = {f"{q}.lora_down.weight": torch.randn(2, w_q.shape[1], generator=g),
              f"{q}.lora_up.weight": torch.randn(w_q.shape[0], 2, generator=g), f"{q}.alpha": torch.tensor(1.0),
              f"{conv}.lora_down.weight": torch.randn(2, *w_conv.shape[1:], generator=g),
              f"{conv}.lora_up.weight": torch.randn(w_conv.shape[0], 2, 1, 1, generator=g)}
        return LoRA(st, 2, 1.0, name)

    a, b = lora("a"), lora("b")
    before = snapshot(toy)
    one = apply_lora(toy, a, 0.5)
    two = apply_lora(one, b, -1.5)
    width = toy.text_encoder.get_input_embeddings().weight.shape[1]
    three = apply_embedding(two, Embedding("<e>", torch.randn(1, width, generator=g), "e"))
    assert_unchanged(toy, before)
    for m in (one, two, three):
        assert shared_fraction(m.unet, toy.unet) == 1.0 and shared_fraction(m.vae, toy.vae) == 1.0
    merged = deltas.plain_state_dict(two.unet)
    own = toy.unet.state_dict()
    assert merged.keys() == own.keys()
    key_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    want_q = own[key_q] + 0.5 * 0.5 * lora_delta(a.state[f"{q}.lora_down.weight"], a.state[f"{q}.lora_up.weight"]) \
        - 1.5 * 0.5 * lora_delta(b.state[f"{q}.lora_down.weight"], b.state[f"{q}.lora_up.weight"])
    assert torch.allclose(merged[key_q], want_q, atol=1e-5)
    key_c = "down_blocks.0.resnets.0.conv1.weight"
    want_c = own[key_c] + 0.5 * lora_delta(a.state[f"{conv}.lora_down.weight"], a.state[f"{conv}.lora_up.weight"]) \
        - 1.5 * lora_delta(b.state[f"{conv}.lora_down.weight"], b.state[f"{conv}.lora_up.weight"])
    assert torch.allclose(merged[key_c], want_c, atol=1e-5)
    assert all(torch.equal(merged[k], own[k]) for k in own if k not in (key_q, key_c))
    # a live LoRA gives the same UNet output as the merged weights
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), toy.encode_prompts(["a star"])
    plain = two.clone()
    assert not deltas.has_deltas(plain.unet)
    with torch.no_grad():
        assert torch.allclose(two.unet(x, t, ctx).sample, plain.unet(x, t, ctx).sample, atol=1e-5)
    # two models with different LoRAs on one base are told apart (resume checks use the fingerprint)
    assert len({toy.fingerprint(), one.fingerprint(), two.fingerprint(), apply_lora(toy, b, 0.5).fingerprint()}) == 4


def test_a_saved_diffusers_folder_of_a_live_lora_holds_the_merged_weights(toy, tmp_path):
    from safetensors.torch import load_file

    from comfyui_finetune.trainers.model.checkpoint import save_diffusers
    from comfyui_finetune.trainers.methods.lora import LoRA, apply_lora

    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    w = toy.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    lora = LoRA({f"{q}.lora_down.weight": torch.ones(1, w.shape[1]), f"{q}.lora_up.weight": torch.ones(w.shape[0], 1)},
                1, 1.0, "ones")
    live = apply_lora(toy, lora, 0.25)
    before = snapshot(live)
    save_diffusers(live, tmp_path / "out", torch.float32)
    assert_unchanged(live, before)  # saving merges into a copy: the live model keeps sharing
    saved = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    own = toy.unet.state_dict()
    assert saved.keys() == own.keys()
    changed = [k for k in own if not torch.equal(saved[k], own[k])]
    assert changed == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert torch.allclose(saved[changed[0]], own[changed[0]] + 0.25)


# ------------------------------------------------------------------------------------------ offloaded models --
# On a GPU an offloaded model's weights wait in CPU memory and visit the GPU while they run. Here (CPU) the visit is
# to the same device, so the tests check the decisions and the sharing; tests/test_cuda.py checks the GPU memory.
def offloaded(toy):
    model = toy.share()
    model.offload = True
    return model


@pytest.mark.parametrize("dataset_opts,method,left", [
    ({}, "lora", "VAE and text encoder"),
    ({"shuffle_captions": True}, "lora", "VAE"),  # a caption never seen could come at any step
    ({"augment": "flip"}, "lora", "text encoder"),  # every step encodes new pixels
    ({}, "ti", "VAE"),  # the text encoder trains
])
def test_frozen_parts_leave_the_device_once_their_outputs_are_cached(toy, tmp_path, caplog, dataset_opts, method,
                                                                      left):
    import logging

    from comfyui_finetune.trainers.data.dataset import Augment
    from comfyui_finetune.trainers.methods.lora import train_lora
    from comfyui_finetune.trainers.methods.textual_inversion import train_textual_inversion

    ds = toy_set()
    if dataset_opts.pop("augment", None):
        ds = ds.with_options(augment=Augment(flip=True))
    ds = ds.with_options(**dataset_opts)
    model = offloaded(toy)
    with caplog.at_level(logging.INFO, logger="comfyui_finetune.trainers.loop"), torch.inference_mode(False):
        if method == "lora":
            t = train_lora(steps(LoRARecipe), model, ds, run_dir(tmp_path, "lora"))
        else:
            t = train_textual_inversion(steps(TextualInversionRecipe, token="<sh>", init_token="star",
                                              caption_mode="object templates"), model, ds, run_dir(tmp_path, "ti"))
    said = [r.getMessage() for r in caplog.records if "once their outputs were cached" in r.getMessage()]
    assert said == [f"{left} left cpu once their outputs were cached"]
    assert t.model.offload  # the result is offloaded like its input, and shares what did not train
    assert shared_fraction(t.model.unet, toy.unet) == 1.0 and shared_fraction(t.model.vae, toy.vae) == 1.0


def test_the_denoiser_joins_the_device_only_after_the_frozen_parts_left(toy, tmp_path, monkeypatch):
    """An offloaded model's denoiser is placed after the VAE and text encoder have left (Z-Image's 8 GB Qwen3-4B and
    12 GB transformer never share a 16 GB GPU), and before the adapters and the optimizer are made."""
    from comfyui_finetune.trainers.loop import run as loop_run
    from comfyui_finetune.trainers.methods.lora import train_lora

    order = []
    for name in ("release_frozen", "place_unet", "_prepare_method"):
        real = getattr(loop_run, name)
        monkeypatch.setattr(loop_run, name, lambda *a, _real=real, _name=name, **kw: (order.append(_name),
                                                                                         _real(*a, **kw))[1])
    with torch.inference_mode(False):
        train_lora(steps(LoRARecipe, train_text_encoder=False), offloaded(toy), toy_set(), run_dir(tmp_path, "o"))
    assert order == ["release_frozen", "place_unet", "_prepare_method"]


def test_an_offloaded_model_trains_and_samples_as_a_placed_one(toy, tmp_path):
    from comfyui_finetune.trainers.methods.lora import train_lora
    from comfyui_finetune.trainers.sampling import sample

    before = snapshot(toy)
    with torch.inference_mode(False):
        a = train_lora(steps(LoRARecipe, train_text_encoder=False), toy, toy_set(), run_dir(tmp_path, "placed"))
        b = train_lora(steps(LoRARecipe, train_text_encoder=False), offloaded(toy), toy_set(),
                       run_dir(tmp_path, "offloaded"))
        pa = sample(a.model, "a sks star", seeds=[1, 2], steps=5)
        pb = sample(b.model, "a sks star", seeds=[1, 2], steps=5)
    assert_unchanged(toy, before)
    assert a.result.state.keys() == b.result.state.keys()
    for k in a.result.state:
        assert torch.allclose(a.result.state[k], b.result.state[k], atol=1e-6), k
    assert float((pa - pb).abs().max()) < 1e-4


def spy_moves(monkeypatch) -> list[str]:
    """The class of every model part moved (Module.to), in order, from now on."""
    seen = []
    to = torch.nn.Module.to

    def spy_to(self, *a, **kw):
        if type(self).__name__ in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"):
            seen.append(type(self).__name__)
        return to(self, *a, **kw)

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    return seen


def test_an_offloaded_model_samples_with_one_part_on_the_device_at_a_time(toy, monkeypatch):
    """The text encoders for the prompts, the UNet for the denoising, the VAE for the decoding: an SDXL's UNet (4.8
    GB) never waits on the GPU beside the VAE's decoding at 1024 px (benchmarks/sdxl_memory.py)."""
    from comfyui_finetune.trainers.sampling import sample

    seen = spy_moves(monkeypatch)
    with torch.inference_mode(False):
        a = sample(offloaded(toy), "a red circle", seeds=[1, 2], steps=4)
    assert seen == ["CLIPTextModel", "UNet2DConditionModel", "AutoencoderKL"]
    seen.clear()
    b = sample(toy, "a red circle", seeds=[1, 2], steps=4)
    assert seen == [] and torch.equal(a, b)


def test_an_offloaded_models_unet_joins_the_device_after_the_latents_are_cached(toy, tmp_path, monkeypatch):
    """The VAE's encoding holds the most memory of the caching (2.5 GB for one SDXL picture at 1024 px,
    benchmarks/sdxl_memory.py): the UNet's weights must not be on the GPU beside it. Here the order of the moves is
    what is checked: every move of a part (Module.to) and every encoding, in the order the run makes them."""
    from comfyui_finetune.trainers.loop import batches
    from comfyui_finetune.trainers.methods.lora import train_lora

    seen = spy_moves(monkeypatch)
    encode = batches.encode_latent_dists

    def spy_encode(*a, **kw):
        seen.append("encode")
        return encode(*a, **kw)

    monkeypatch.setattr(batches, "encode_latent_dists", spy_encode)
    with torch.inference_mode(False):
        train_lora(steps(LoRARecipe, steps=1), offloaded(toy), toy_set(), run_dir(tmp_path, "order"))
    first = seen.index("encode")
    assert set(seen[:first]) == {"AutoencoderKL", "CLIPTextModel"}, seen
    assert "UNet2DConditionModel" in seen[first:], seen
    seen.clear()
    with torch.inference_mode(False):  # a model that is not offloaded is on its device already: nothing moves
        train_lora(steps(LoRARecipe, steps=1), toy.share(), toy_set(), run_dir(tmp_path, "placed"))
    assert seen[:1] == ["encode"] and "UNet2DConditionModel" not in seen, seen


def test_an_offloaded_dreambooths_class_pictures_are_encoded_before_the_unet_joins(toy, tmp_path, monkeypatch):
    """Prior preservation encodes its class pictures too (DreamBooth's ``encode_extra``): like the dataset's, before
    the UNet comes to the device; the loss is the same as a model's that is not offloaded."""
    from comfyui_finetune.trainers.loop import batches
    from comfyui_finetune.trainers.methods import dreambooth
    from comfyui_finetune.trainers.methods.dreambooth import Subject, train_dreambooth

    seen = spy_moves(monkeypatch)
    encode = batches.encode_latent_dists

    def spy_encode(model, pixels):
        seen.append(f"encode {len(next(iter(pixels.values())))}")
        return encode(model, pixels)

    monkeypatch.setattr(batches, "encode_latent_dists", spy_encode)
    monkeypatch.setattr(dreambooth, "encode_latent_dists", spy_encode)
    subject = Subject(toy_set(caption="a <sks> star", n=4), "a <sks> star", "a star",
                      toy_set(color="yellow", caption="a star", n=3))
    recipe = steps(DreamBoothRecipe, steps=1, prior_preservation=True, num_class_images=3,
                   instance_prompt="a <sks> star", class_prompt="a star")
    with torch.inference_mode(False):
        got = train_dreambooth(recipe, offloaded(toy), [subject], run_dir(tmp_path, "order"))
    unet = seen.index("UNet2DConditionModel")
    assert seen[:unet].count("encode 4") == 1 and seen[:unet].count("encode 3") == 1, seen  # dataset, then class
    assert set(seen[:unet]) == {"AutoencoderKL", "CLIPTextModel", "encode 4", "encode 3"}, seen
    with torch.inference_mode(False):
        again = train_dreambooth(recipe, toy.share(), [subject], run_dir(tmp_path, "placed"))
    assert got.log[0]["loss"] == again.log[0]["loss"]
