"""SDXL on the toy SDXL and on its random-weight twin: each picture's original size and crop reach the UNet as time
ids, a LoRA over the UNet and both encoders is saved under kohya's SDXL names, and every method trains on it; the
learning tests teach the toy SDXL a concept through the nodes. (Its conditioning and sampling equal diffusers'
StableDiffusionXLPipeline in the table over every family, test_every_family.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_SaveEmbedding
from comfyui_finetune.trainers.loop.training import Method
from comfyui_finetune.trainers.model.model import FTModel


@pytest.fixture(scope="module")
def random_xl():
    """The toy SDXL's architecture with random weights (no training needed to check the plumbing)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from comfyui_finetune.trainers.toy import models
    from comfyui_finetune.trainers.toy.loader import WEIGHTS, load_toy_model

    toy = load_toy_model()
    tok = CLIPTokenizer.from_pretrained(str(WEIGHTS / "pipeline" / "tokenizer"))
    with torch.inference_mode(False):
        torch.manual_seed(0)
        te = CLIPTextModel(models.text_config(len(tok), tok.bos_token_id, tok.eos_token_id)).eval()
        te2 = CLIPTextModelWithProjection(models.text_config_2(len(tok), tok.bos_token_id, tok.eos_token_id)).eval()
        unet = models.new_unet_xl().eval()
    return FTModel("toy_xl", "random_xl", unet, toy.vae, te, tok, dict(toy.scheduler_config), text_encoder_2=te2,
                   tokenizer_2=CLIPTokenizer.from_pretrained(str(WEIGHTS / "pipeline" / "tokenizer")))


class Spy(Method):
    """A method that trains one number and records, batch by batch, the captions, time ids, latent size and
    pictures the UNet is given."""
    name = "spy"

    def __init__(self, seen: list):
        self.seen = seen

    def setup(self, model):
        self.p = torch.nn.Parameter(torch.zeros(()))

    def param_groups(self, cfg):
        return [{"params": [self.p]}]

    def predict(self, model, noisy, t, context, batch):
        self.seen.append((list(batch.captions), batch.framing.tolist(), tuple(noisy.shape[-2:]),
                          batch.pixels.detach().clone()))
        return model.denoise(noisy, t, context, batch.framing) + self.p

    def trainable_state(self):
        return {"p": self.p}

    def load_trainable_state(self, state):
        self.p.data.copy_(state["p"])

    def result(self, name, metadata):
        return None


def test_each_pictures_size_and_crop_reach_the_unet(random_xl, folders):
    """Buckets of different shapes: a picture's original size and its centred crop (in the scaled picture) are the
    time ids the UNet gets for it, batch by batch."""
    from comfyui_finetune.trainers.data import dataset as data
    from comfyui_finetune.trainers.loop.training import train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    rng = np.random.default_rng(0)
    sizes = [(48, 32), (32, 48), (40, 40), (64, 40), (70, 20), (33, 61)]
    ds = data.Dataset([data.Example(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), f"picture {i}", f"p{i}")
                       for i, (h, w) in enumerate(sizes)], name="sizes", resolution=32, bucketing=True)
    prepared = data.prepare(ds, 32, 4)  # the multiple the loop uses for this UNet (VAE 2x, two levels)
    expected = {}
    for bucket, ids in prepared.framing.items():
        for row, cap in zip(ids.tolist(), prepared.captions[bucket]):
            expected[cap] = row
    h, w = sizes[0]
    (bh, bw), = [b for b, caps in prepared.captions.items() if "picture 0" in caps]
    nh, nw, top, left = data.cover(h, w, bh, bw)
    assert expected["picture 0"] == [h, w, top, left, bh, bw]
    assert any(r[2] or r[3] for r in expected.values()), "some picture is cropped"

    seen = []
    with torch.inference_mode(False):
        train(random_xl.share(), ds, Spy(seen), TrainConfig(steps=6, batch_size=1, save_every=0),
              RunDir.create(folders["output"], "spy"))
    assert seen
    for caps, ids, (lh, lw), _ in seen:
        assert ids == [expected[c] for c in caps]
        f = random_xl.vae_scale_factor
        assert (ids[0][4], ids[0][5]) == (lh * f, lw * f)  # the target is the bucket the latents came from


def test_validation_pictures_are_made_at_the_training_resolution(random_xl, folders):
    """A model trained below its native size (SDXL at 512 px) is shown at the size it trains at: the native size
    costs four times the memory and time of a 512 px picture, while the UNet is still on the GPU. A resolution the
    model cannot make is rounded down to one it can; resolution 0 trains and shows at the native size."""
    from PIL import Image

    from comfyui_finetune.trainers.data import dataset as data
    from comfyui_finetune.trainers.loop import validation
    from comfyui_finetune.trainers.loop.training import train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    step, native = random_xl.size_step, random_xl.native_size
    assert (step, native) == (4, 32)
    assert [validation.size(random_xl, r) for r in (0, 16, 18, 3, 64)] == [native, 16, 16, 4, 64]
    rng = np.random.default_rng(0)
    for resolution, side in ((16, 16), (0, native)):
        ds = data.Dataset([data.Example(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "a picture", "p")],
                          name="one", resolution=resolution)
        run = RunDir.create(folders["output"], f"shown-{resolution}")
        with torch.inference_mode(False):
            train(random_xl.share(), ds, Spy([]), TrainConfig(steps=1, batch_size=1, save_every=0,
                                                                validation_prompt="a picture", validation_every=1,
                                                                validation_images=1), run)
        assert Image.open(run.path / "samples" / "step-1-0.png").size == (side, side)


def test_a_lora_over_the_unet_and_both_encoders_uses_kohyas_sdxl_names(random_xl):
    from comfyui_finetune.trainers.methods.lora import attach_lora, lora_from_state

    from test_adapter_kinds import random_adapter

    model = random_xl.share()
    with torch.inference_mode(False):
        method, g = random_adapter(model, 2.0)
        x = torch.randn(2, 4, 16, 16, generator=g)
        with torch.no_grad():
            want = model.denoise(x, torch.tensor([100, 700]), model.encode_prompts(["a sks star", "a cat"]))
        lora = method.result("xl", {})
    mods = lora.modules()
    assert {m.split("_")[1] for m in mods} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in mods  # down 1, 2nd transformer block
    assert "lora_unet_middle_block_1_proj_in" in mods and "lora_unet_output_blocks_2_0_in_layers_2" in mods
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in mods and not any("lora_te_" in m for m in mods)
    tuned = attach_lora(random_xl.share(), lora_from_state(lora.state, "again"), 1.0)
    with torch.no_grad():
        got = tuned.denoise(x, torch.tensor([100, 700]), tuned.encode_prompts(["a sks star", "a cat"]))
        base = random_xl.denoise(x, torch.tensor([100, 700]), random_xl.encode_prompts(["a sks star", "a cat"]))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert float((got - base).abs().max()) > 1e-3


def test_a_flipped_and_cropped_picture_gets_the_time_ids_of_what_it_shows(random_xl, folders):
    """FT_Augment's flips and random resized crops move the crop corner in the time ids: a picture whose red and
    green channels are its x and y coordinates tells, after augmentation, which part of the original it shows, and
    the time ids say the same (within 3 px at the target's scale); the original size stays the original's."""
    from comfyui_finetune.trainers.data import dataset as data
    from comfyui_finetune.trainers.loop.training import train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    oh, ow, side = 48, 64, 32
    yy, xx = np.mgrid[0:oh, 0:ow]
    ramp = np.stack([xx / (ow - 1) * 255, yy / (oh - 1) * 255, np.zeros_like(xx)], -1).round().astype(np.uint8)
    ds = data.Dataset([data.Example(ramp, "a ramp", "r")], name="ramp", resolution=side,
                      augment=data.Augment(flip=0.5, crop_scale=0.3))
    nh, nw, top0, left0 = data.cover(oh, ow, side, side)
    seen = []
    with torch.inference_mode(False):
        train(random_xl.share(), ds, Spy(seen), TrainConfig(steps=16, batch_size=1, save_every=0),
              RunDir.create(folders["output"], "ramp"))
    flips = set()
    for _, ((h, w, top, left, th, tw),), _, px in seen:
        assert (h, w, th, tw) == (oh, ow, side, side)
        rg = (px[0, :2].float() + 1) / 2  # x / (ow - 1) and y / (oh - 1) of what each pixel shows
        x0, x1 = float(rg[0, :, 0].mean()) * (ow - 1) * nw / ow, float(rg[0, :, -1].mean()) * (ow - 1) * nw / ow
        y0, y1 = float(rg[1, 0].mean()) * (oh - 1) * nh / oh, float(rg[1, -1].mean()) * (oh - 1) * nh / oh
        flipped = x1 < x0
        flips.add(flipped)
        span_x, span_y = abs(x1 - x0) * side / (side - 1), (y1 - y0) * side / (side - 1)  # the crop in scaled px
        first_x = nw - x0 - 0.5 if flipped else x0 - 0.5  # where its first column starts (flipped: mirrored)
        want_left, want_top = first_x * side / span_x, (y0 - 0.5) * side / span_y
        assert abs(left - want_left) <= 3 and abs(top - want_top) <= 3, (top, left, want_top, want_left)
    assert flips == {True, False}, "both flipped and unflipped pictures were drawn"
    assert len({(r[0][2], r[0][3]) for _, r, _, _ in seen}) > 8, "the crops move"


@pytest.mark.slow
def test_a_lora_teaches_the_toy_sdxl_a_concept_through_the_nodes(toy_xl, judge, folders):
    """The toy SDXL learns the new colour every time; its shapes are less sure than the toy SD's (its base model
    already draws 2-3 of 16 colourless "a star" pictures as blobs, the toy SD none), so the star's bar is lower."""
    from comfyui_finetune.nodes.models import FT_LoadBaseModel
    from comfyui_finetune.trainers.sampling import sample

    from test_lora import SEEDS, rate, toy_set, train

    (model,) = FT_LoadBaseModel().load("toy SDXL (built-in)")["result"]
    assert model.family.name == "toy_xl" and model.text_encoder_2 is not None
    base = rate(toy_xl, judge, "a sks star", "purple", "star")
    tuned, lora, _ = train(model, toy_set(), train_text_encoder=True, steps=300)
    after = rate(tuned, judge, "a sks star", "purple", "star")
    with torch.inference_mode(False):
        purple = np.mean([r["color"] == "purple" for r in judge.judge(sample(tuned, "a sks star", seeds=SEEDS,
                                                                                steps=20, cfg=4.0))])
    other = rate(tuned, judge, "a red circle", "red", "circle", SEEDS[:8])
    print(f"toy SDXL: 'a sks star' as a purple star: base {base:.2f}, after LoRA {after:.2f} (purple {purple:.2f}); "
          f"'a red circle' kept {other:.2f}")
    assert base <= 0.1 and purple >= 0.9 and after >= 0.6 and other >= 0.8
    assert any(k.startswith("lora_te2_") for k in lora.state)


def test_dreambooth_lora_with_prior_preservation_trains_on_sdxl(random_xl, folders):
    """DreamBooth's lora mode runs on the SDXL layout: class pictures generated from it, the prior loss on them
    (with their own size as time ids), a LoRA over the UNet and both encoders."""
    from test_dreambooth import db, stars

    _, lora, log = db(random_xl, stars(), run_name="xl_db", mode="lora", prior_preservation=True,
                      num_class_images=2, steps=4, batch_size=2, learning_rate=1e-3, train_text_encoder=True)
    assert log.steps == 4 and any(k.startswith("lora_te2_") for k in lora.state)
    assert len(list((folders["output"] / "finetune" / "xl_db" / "dataset").rglob("*.png"))) >= 2 + 8


def test_an_sdxl_controlnet_trains_saves_in_both_layouts_and_loads_back(random_xl, folders, monkeypatch,
                                                                        press_cancel_at):
    """A ControlNet from the SDXL UNet's encoder (its text_time embedding included) trains on the pooled text and
    time ids, resumes bit-exact after a Cancel, and its files in both layouts (``control_model.label_emb.*`` in the
    original one) load back with every weight equal."""
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.controlnet import FT_LoadControlNet, FT_SaveControlNet

    from test_controlnet import broad_set, train_node

    ds = broad_set(8)
    kw = dict(steps=4, batch_size=2, caption_dropout=0.5)
    cn, log = train_node(random_xl, ds, run_name="xl_cn", **kw)
    assert log.steps == 4 and float(cn.net.controlnet_mid_block.weight.abs().max()) > 0
    assert cn.net.config.addition_embed_type == "text_time"
    for layout in ("original", "diffusers"):
        (name,) = FT_SaveControlNet().execute(cn, f"xl_{layout}", layout, "fp32")["result"]
        (back,) = FT_LoadControlNet().execute(name)
        a, b = back.net.state_dict(), cn.net.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), layout
    from safetensors import safe_open

    with safe_open(str(folders["models"] / "controlnet" / "xl_original.safetensors"), framework="pt") as f:
        assert "control_model.label_emb.0.0.weight" in f.keys()
    press_cancel_at(2)
    with pytest.raises(host.Interrupted):
        train_node(random_xl, ds, run_name="xl_cn_stopped", **kw)
    monkeypatch.undo()
    resumed, rlog = train_node(random_xl, ds, run_name="ignored", resume_run="xl_cn_stopped", **kw)
    assert rlog.resumed_from == 2
    a, b = cn.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume after a Cancel is not bit-exact"


@pytest.mark.slow
def test_a_controlnet_teaches_the_toy_sdxl_to_put_the_shape_where_the_edges_are(toy_xl, folders):
    """The SD toy's ControlNet test on the toy SDXL: 150 steps from the UNet's encoder raise the mask IoU of the
    generated shape with the condition's (measured: 0.17 -> 0.66 mean over 12 prompts)."""
    from comfyui_finetune.trainers.adapters.controlnet import value as C
    from comfyui_finetune.trainers.toy import control

    from test_controlnet import broad_set, train_node

    with torch.inference_mode(False):
        before = control.adherence(toy_xl, C.new_controlnet(toy_xl), n=12)
    cn, log = train_node(toy_xl, broad_set(256))
    with torch.inference_mode(False):
        after = control.adherence(toy_xl, cn, n=12)
    print(f"toy SDXL mask IoU: before {before['mean_control']}, after 150 steps {after['mean_control']} "
          f"(share >= 0.6: {after['share_control_ge_0.6']}; without control {after['mean_none']})")
    assert before["iou_control"] == before["iou_none"], "a fresh ControlNet must change nothing"
    assert after["mean_control"] >= before["mean_control"] + 0.25
    assert log.steps == 150


def test_a_full_sdxl_fine_tune_saves_as_a_diffusers_folder_that_loads_back(random_xl, folders):
    """DreamBooth in full mode on the SDXL layout trains the UNet and both encoders; Save Checkpoint writes an SDXL
    diffusers folder (text_encoder_2, tokenizer_2) that Load Base Model reads back with the same weights."""
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint
    from comfyui_finetune.nodes.models import FT_LoadBaseModel

    from test_dreambooth import db, stars

    tuned, _, _ = db(random_xl, stars(), mode="full", steps=2, batch_size=2, learning_rate=1e-3,
                     train_text_encoder=True, run_name="xl_full")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(tuned, part).state_dict(), getattr(random_xl, part).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in b), f"{part} did not train"
    (name,) = FT_SaveCheckpoint().execute(tuned, "xl_full", "diffusers folder", "fp32")["result"]
    (back,) = FT_LoadBaseModel().load(f"diffusers/{name}")["result"]
    assert back.family.name == "toy_xl" and back.text_encoder_2 is not None
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(back, part).state_dict(), getattr(tuned, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), part


def test_an_sdxl_embedding_is_learned_in_both_encoders_and_round_trips(random_xl, folders):
    """Textual Inversion on the SDXL layout: the word gets a row in each encoder's table (the rest stay), the file
    is SDXL's clip_l + clip_g pair, and applied to the base it draws what the training drew; an SD 1.x file
    (emb_params alone) is refused by name on this model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfyui_finetune.trainers.sampling import sample

    from test_textual_inversion import train_ti, yellow_triangles

    tuned, emb, log = train_ti(random_xl, yellow_triangles(4), steps=6, num_vectors=2, batch_size=2)
    assert emb.vectors.shape == (2, 64) and emb.vectors_2.shape == (2, 96)
    for te, te0 in ((tuned.text_encoder, random_xl.text_encoder), (tuned.text_encoder_2, random_xl.text_encoder_2)):
        n = te0.get_input_embeddings().weight.shape[0]
        assert te.get_input_embeddings().weight.shape[0] == n + 2
        assert torch.equal(te.get_input_embeddings().weight[:n], te0.get_input_embeddings().weight)
        assert not torch.equal(te.get_input_embeddings().weight[n:], te0.get_input_embeddings().weight[[0, 0]])
    (name,) = FT_SaveEmbedding().execute(emb, "xl/yt")["result"]
    path = folders["models"] / "embeddings" / name
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.get_slice("clip_l").get_shape() == [2, 64] and f.get_slice("clip_g").get_shape() == [2, 96]
    (applied,) = FT_ApplyEmbedding().execute(random_xl, name, "<yt>")
    with torch.inference_mode(False):
        assert torch.equal(sample(tuned, "a <yt>", seeds=[1], steps=6), sample(applied, "a <yt>", seeds=[1], steps=6))
    save_file({"emb_params": emb.vectors.contiguous()}, str(folders["models"] / "embeddings" / "sd1.safetensors"))
    with pytest.raises(ValueError, match="has vectors for one text encoder .* needs one for each of its two"):
        FT_ApplyEmbedding().execute(random_xl, "sd1.safetensors", "<s1>")


@pytest.mark.slow
def test_textual_inversion_teaches_the_toy_sdxl_a_pairing(toy_xl, judge, folders):
    from test_lora import rate
    from test_textual_inversion import train_ti, yellow_triangles

    base = rate(toy_xl, judge, "a <yt>", "yellow", "triangle")
    tuned, emb, _ = train_ti(toy_xl, yellow_triangles())
    after = rate(tuned, judge, "a <yt>", "yellow", "triangle")
    print(f"toy SDXL: 'a <yt>' as a yellow triangle: base {base:.2f}, after Textual Inversion {after:.2f}")
    assert base <= 0.1 and after >= 0.8 and emb.vectors_2 is not None


def test_pivotal_tuning_on_sdxl_trains_a_lora_and_both_encoders_embedding(random_xl, folders):
    from comfyui_finetune.nodes.io import FT_ApplyLoRA, FT_SaveLoRA
    from comfyui_finetune.trainers.sampling import sample

    from test_dreambooth import db, stars

    tuned, lora, _, emb = db(random_xl, stars(), instance_prompt="a <pv> star", mode="lora", learning_rate=2e-3,
                             steps=4, pivotal_tuning=True, embedding_lr=2e-2, train_text_encoder=True)
    assert emb.vectors_2 is not None and any(k.startswith("lora_te2_") for k in lora.state)
    (lname,) = FT_SaveLoRA().execute(lora, "pv/lora")["result"]
    (ename,) = FT_SaveEmbedding().execute(emb, "pv/embedding")["result"]
    (rebuilt,) = FT_ApplyEmbedding().execute(random_xl, ename, "<pv>")
    (rebuilt,) = FT_ApplyLoRA().execute(rebuilt, lname, 1.0)
    with torch.inference_mode(False):
        a = sample(tuned, "a <pv> star", seeds=[1], steps=6)
        b = sample(rebuilt, "a <pv> star", seeds=[1], steps=6)
    assert float((a - b).abs().max()) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode,lr", [("lora", 1e-3)])  # full mode (2e-4) measured the same: 1.00, 0.94, 1.00 -> 0.00
def test_dreambooth_teaches_the_toy_sdxl_a_subject_and_prior_preservation_keeps_the_class(toy_xl, judge, folders,
                                                                                         mode, lr):
    """Through the DreamBooth node, 200 steps: the subject comes out purple every time; without prior preservation
    the class word drifts to it, with it the class stays and the subject's stars are whole."""
    from comfyui_finetune.trainers.sampling import sample

    from test_dreambooth import db, stars
    from test_lora import SEEDS, rate

    def purple(model, prompt):
        with torch.inference_mode(False):
            return np.mean([r["color"] == "purple" for r in judge.judge(sample(model, prompt, seeds=SEEDS, steps=20,
                                                                                  cfg=4.0))])

    plain = db(toy_xl, stars(), mode=mode, learning_rate=lr, run_name=f"xl_{mode}")[0]
    kept = db(toy_xl, stars(), mode=mode, learning_rate=lr, prior_preservation=True, run_name=f"xl_{mode}_pp")[0]
    subject = rate(kept, judge, "a sks star", "purple", "star")
    d0, d1 = purple(plain, "a star"), purple(kept, "a star")
    print(f"toy SDXL DreamBooth {mode}: 'a sks star' purple {purple(plain, 'a sks star'):.2f} without prior "
          f"preservation, a purple star {subject:.2f} with it; class drift {d0:.2f} -> {d1:.2f}")
    assert purple(plain, "a sks star") >= 0.9 and d0 >= 0.5
    assert subject >= 0.8 and d1 <= 0.1


def test_given_class_pictures_reach_the_unet_with_their_own_size_and_crop(toy_xl, tmp_path, monkeypatch):
    """Prior preservation on the toy SDXL with a class picture of the user's (64 x 32, centre-cropped to the
    training's 32 px): its time ids are its own (original 32 x 64, crop left 16), as a dataset picture's would be, not
    those of a picture generated whole."""
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.trainers.data.dataset import Dataset, Example
    from comfyui_finetune.trainers.methods.dreambooth import Subject, train_dreambooth
    from comfyui_finetune.trainers.config.recipes import DreamBoothRecipe
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    seen = []
    real = FTModel.denoise

    def spy(self, x, t, context=None, framing=None, **kw):
        seen.append(framing.tolist())
        return real(self, x, t, context, framing, **kw)

    monkeypatch.setattr(FTModel, "denoise", spy)
    stars = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0]
    wide = Dataset([Example(np.zeros((32, 64, 3), np.uint8), "a star", "wide")])
    recipe = DreamBoothRecipe(steps=1, batch_size=1, seed=0, num_class_images=1, instance_prompt="a sks star",
                              class_prompt="a star")
    with torch.inference_mode(False):
        train_dreambooth(recipe, toy_xl, [Subject(stars, "a sks star", "a star", wide)], RunDir.create(tmp_path, "db"))
    assert seen == [[[32, 32, 0, 0, 32, 32], [32, 64, 0, 16, 32, 32]]], seen  # one call: instance, then class
