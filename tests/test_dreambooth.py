"""DreamBooth on the toy world: in LoRA and full modes the subjects are learnt, prior preservation keeps the class
without costing the subject (issue 17's bar, alone and two at once), several subjects keep apart, class pictures are
generated once and then reused."""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.nodes.io import FT_SaveLoRA
from comfyui_finetune.nodes.train import FT_DreamBoothSubject, FT_TrainDreamBooth
from comfyui_finetune.trainers import sampling

from test_lora import rate


def stars():
    return FT_ToyDataset().execute("purple", "star", 8, "unused", 0, "narrow")[0]


def db(model, dataset, **kw):
    args = dict(instance_prompt="a sks star", class_prompt="a star", prior_preservation=False, prior_loss_weight=1.0,
                num_class_images=32, mode="full", train_text_encoder=False, steps=200, learning_rate=2e-4,
                batch_size=4, seed=0, run_name="db")
    args.update(kw)
    out = FT_TrainDreamBooth().execute(model, dataset, **args)
    assert len(out) == 4 and (out[3] is None) == (not kw.get("pivotal_tuning"))
    return out if kw.get("pivotal_tuning") else out[:3]


def circles_and_triangles():
    """Issue 17's concepts: six purple circles "a sks circle" (the base never draws purple) and six yellow
    triangles "a zwx triangle" (a pairing it was never shown)."""
    circles = FT_ToyDataset().execute("purple", "circle", 6, "x", 0, "narrow")[0]
    tri = FT_ToyDataset().execute("yellow", "triangle", 6, "x", 0, "narrow")[0]
    return circles, tri


SEEDS_32 = list(range(2000, 2032))


def judged(tuned, judge):
    """(circle subject, triangle subject, 'a circle' drawn purple, 'a triangle' drawn yellow) over 32 pictures."""
    return [rate(tuned, judge, "a sks circle", "purple", "circle", SEEDS_32),
            rate(tuned, judge, "a zwx triangle", "yellow", "triangle", SEEDS_32),
            rate(tuned, judge, "a circle", "purple", "circle", SEEDS_32),
            rate(tuned, judge, "a triangle", "yellow", "triangle", SEEDS_32)]


@pytest.mark.slow
def test_lora_mode_keeps_the_subjects_and_the_classes_alone_and_two_at_once(toy, judge, folders):
    """Issue 17's bar in lora mode (lr 1e-3, 16 class pictures, 400 steps for one subject, 600 for two): with prior
    preservation the subject stays within 10 points of its rate without it, the class drifts at most 10 %, and each
    of two subjects trained at once stays within 10 points of its rate alone. Measured over 5 seeds x 32 pictures
    (benchmarks/bench_dreambooth.py): one subject 0.97-1.00 without, 1.00 with, drift 1.00 -> 0.00; at 200 steps
    2 of 5 seeds still drifted 0.16-0.22, the class pictures' pull not yet caught up."""
    circles, tri = circles_and_triangles()
    one = dict(instance_prompt="a sks circle", class_prompt="a circle", mode="lora", learning_rate=1e-3,
               num_class_images=16, steps=400, target_modules="attention+feedforward")  # the preset it was measured on
    got = {}
    for pp in (False, True):
        tuned, lora, _ = db(toy, circles, prior_preservation=pp, run_name=f"one_pp{int(pp)}", **one)
        got[pp] = judged(tuned, judge)
    assert lora is not None
    print(f"one subject, lora mode (subject, drift): without prior preservation {got[False][::2]}, with it "
          f"{got[True][::2]}")
    assert got[False][0] >= 0.8, "the subject should be learnt (else nothing is measured)"
    assert got[False][2] >= 0.3, "without prior preservation the class should drift (else nothing is measured)"
    assert got[True][0] >= got[False][0] - 0.1 and got[True][2] <= 0.1
    assert rate(tuned, judge, "a red square", "red", "square", SEEDS_32[:8]) >= 0.8, "other prompts stay"

    # the circle alone is the run above; the triangle alone reached 1.00 with prior preservation in every seed
    # measured (bench_dreambooth.py --only two --pp-only --modes lora --steps 400, seeds 0-4): taken as known,
    # which saves the suite a 45-second run
    alone = [got[True][0], 1.0]
    subs = FT_DreamBoothSubject().execute(circles, "a sks circle", "a circle")[0]
    subs = FT_DreamBoothSubject().execute(tri, "a zwx triangle", "a triangle", previous=subs)[0]
    pair, _, log = db(toy, circles, subjects=subs, prior_preservation=True, run_name="pair",
                      **{**one, "steps": 600})
    both = judged(pair, judge)
    print(f"two subjects, lora mode, with prior preservation: alone {alone}, together {both}")
    assert both[0] >= alone[0] - 0.1 and both[1] >= alone[1] - 0.1
    assert both[2] <= 0.1 and both[3] <= 0.1
    assert [s["identifier"] for s in log.config["subjects"]] == ["sks", "zwx"]


@pytest.mark.slow
def test_two_subjects_in_full_mode_keep_the_subjects_and_the_classes(toy, judge, folders):
    """Issue 17's bar for two subjects in full mode (purple circles "a sks circle" + yellow triangles "a zwx
    triangle", 16 class pictures, 300 steps, lr 4e-4): with prior preservation each subject stays within 10 points of
    its rate without it and the classes drift at most 10 % (5 seeds x 32 pictures: subjects 1.00 / 1.00, circle drift
    0.00-0.03; at lr 2e-4 the drift was 0.27 on average)."""
    circles, tri = circles_and_triangles()
    subs = FT_DreamBoothSubject().execute(circles, "a sks circle", "a circle")[0]
    subs = FT_DreamBoothSubject().execute(tri, "a zwx triangle", "a triangle", previous=subs)[0]
    got = {}
    for pp in (False, True):
        tuned, lora, _ = db(toy, circles, instance_prompt="a sks circle", class_prompt="a circle", subjects=subs,
                            prior_preservation=pp, num_class_images=16, steps=300, learning_rate=4e-4,
                            run_name=f"two_pp{int(pp)}")
        got[pp] = judged(tuned, judge)
    print(f"two subjects, full mode, lr 4e-4 (circle, triangle, circle drift, triangle drift): without prior "
          f"preservation {got[False]}, with it {got[True]}")
    assert lora is None
    assert got[False][0] >= 0.8 and got[False][1] >= 0.8
    assert got[True][0] >= got[False][0] - 0.1 and got[True][1] >= got[False][1] - 0.1
    assert got[True][2] <= 0.1 and got[True][3] <= 0.1
    assert got[False][2] >= 0.3, "without prior preservation the class should drift (else nothing is measured)"
    other = [rate(tuned, judge, "a sks circle", "yellow", "triangle", SEEDS_32[:16]),
             rate(tuned, judge, "a zwx triangle", "purple", "circle", SEEDS_32[:16])]
    assert max(other) <= 0.2, f"each identifier should draw its own subject, not the other's: {other}"
    assert rate(tuned, judge, "a red square", "red", "square", SEEDS_32[:8]) >= 0.8, "other prompts stay"


def test_class_pictures_train_at_the_instance_pictures_resolution(toy, folders, monkeypatch):
    """Class pictures are made at the instance dataset's resolution, and must be encoded at it too: not at the
    model's native size (an SDXL trained at 512 px had its class prior at 1024 px, each step a 1024 px UNet call
    beside the 512 px one)."""
    from comfyui_finetune.trainers.loop import batches
    from comfyui_finetune.trainers.methods import dreambooth

    sizes = []
    encode = batches.encode_latent_dists

    def spy(model, pixels):
        sizes.extend((len(px), tuple(px.shape[-2:])) for px in pixels.values())
        return encode(model, pixels)

    monkeypatch.setattr(batches, "encode_latent_dists", spy)
    monkeypatch.setattr(dreambooth, "encode_latent_dists", spy)
    given = FT_ToyDataset().execute("yellow", "star", 3, "a star", 0, "narrow")[0]
    for res in (0, 48):  # 0: the toy's native 32 px
        sizes.clear()
        db(toy, stars().with_options(resolution=res), class_dataset=given, prior_preservation=True,
           num_class_images=3, steps=1, batch_size=2, run_name=f"db-{res}")
        side = res or 32
        assert sizes == [(8, (side, side)), (3, (side, side))], sizes  # the instance pictures, then the class's


def test_class_pictures_are_generated_once_then_reused(toy, folders, monkeypatch):
    kw = dict(prior_preservation=True, num_class_images=4, steps=2, batch_size=2)
    db(toy, stars(), **kw)
    cache = folders["output"] / "finetune" / "class_images"
    assert len(list(cache.glob("*/manifest.json"))) == 1

    def no_generation(*a, **k):
        raise AssertionError("class pictures were generated again")

    monkeypatch.setattr(sampling, "sample", no_generation)
    db(toy, stars(), **kw)  # same model, prompt, count, resolution and seed: from the cache
    monkeypatch.undo()
    db(toy, stars(), **{**kw, "num_class_images": 5})  # another count: a new set
    assert len(list(cache.glob("*/manifest.json"))) == 2


def test_a_connected_scorer_warns_when_the_class_pictures_do_not_show_the_class(toy, folders, caplog):
    """The toy never drew a cross: its "a cross" pictures are squares and circles, which prior preservation would
    teach as the class. With a CLIP scorer connected, DreamBooth says so before it trains (and the run's config
    keeps each subject's check); the stars it draws pass."""
    import json
    import logging

    from comfyui_finetune.trainers.eval.metrics import load_clip_scorer
    from comfyui_finetune.trainers.toy.loader import WEIGHTS

    scorer = load_clip_scorer(WEIGHTS / "clip")
    crosses = FT_ToyDataset().execute("purple", "cross", 8, "unused", 0, "narrow")[0]
    kw = dict(prior_preservation=True, num_class_images=8, steps=1, batch_size=2, scorer=scorer)
    checks = {}
    for name, data, cls in (("crosses", crosses, "a cross"), ("stars", stars(), "a star")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            log = db(toy, data, instance_prompt=f"a sks {cls[2:]}", class_prompt=cls, run_name=name, **kw)[2]
        config = json.loads((folders["output"] / "finetune" / log.run / "config.json").read_text())
        (checks[name],) = config["class_check"]
        warned = [r.getMessage() for r in caplog.records if "do not look like it" in r.getMessage()]
        assert bool(warned) == (name == "crosses"), warned
    assert not checks["crosses"]["ok"] and checks["stars"]["ok"], checks
    assert checks["crosses"]["class_clip_t"] < 0.5 * checks["crosses"]["subject_clip_t"], checks
    assert "class_check" not in json.loads((folders["output"] / "finetune" / db(
        toy, stars(), **{**kw, "scorer": None}, run_name="none")[2].run / "config.json").read_text())


def test_two_stages_chain_models_merged_or_stacked(toy, judge, folders):
    """Stage two trains on stage one's model (merged). Kept as two adapters instead, the two LoRAs stacked on the
    base model with Apply LoRA give the same model."""
    from comfyui_finetune.nodes.io import FT_ApplyLoRA
    from comfyui_finetune.trainers.model.deltas import plain_state_dict

    stage1, lora1, _ = db(toy, stars(), mode="lora", learning_rate=1e-3, steps=3, batch_size=2)
    tri = FT_ToyDataset().execute("yellow", "triangle", 4, "unused", 0, "narrow")[0]
    stage2, lora2, log = db(stage1, tri, instance_prompt="a zwx triangle", class_prompt="a triangle", mode="lora",
                            learning_rate=1e-3, steps=3, batch_size=2)
    chain = [h.get("trained") for h in log.config["model"]["history"]]
    assert chain == ["dreambooth-lora"], log.config["model"]["history"]
    assert [h.get("trained") for h in stage2.history] == ["dreambooth-lora", "dreambooth-lora"]
    (stacked,) = FT_ApplyLoRA().execute(toy, "none", 1.0, lora=lora1)
    (stacked,) = FT_ApplyLoRA().execute(stacked, "none", 1.0, lora=lora2)
    # the weights as the adapters make them (parameters() would give the parametrized layers' originals: the base)
    merged = {name: plain_state_dict(m.unet) for name, m in (("base", toy), ("stacked", stacked), ("stage2", stage2))}
    assert max(float((merged["stage2"][k] - v).abs().max()) for k, v in merged["base"].items()) > 1e-4
    assert merged["stacked"].keys() == merged["stage2"].keys()
    for k, v in merged["stage2"].items():
        assert torch.allclose(merged["stacked"][k], v, atol=1e-6), k


def test_bad_dreambooth_input(toy, folders):
    ds = stars()
    with pytest.raises(ValueError, match="class_prompt is empty but prior_preservation is on"):
        db(toy, ds, class_prompt=" ", prior_preservation=True)
    with pytest.raises(ValueError, match="prior_loss_weight must be at least 0, got -1"):
        db(toy, ds, prior_loss_weight=-1.0)
    subs = FT_DreamBoothSubject().execute(ds, "a sks star", "a star")[0]
    subs = FT_DreamBoothSubject().execute(ds, "a sks circle", "a circle", previous=subs)[0]
    with pytest.raises(ValueError, match="subjects 1 and 2 use the same identifier 'sks'"):
        db(toy, ds, subjects=subs)
    mult = toy.size_step
    odd = 8 * mult + 1
    with pytest.raises(ValueError, match=f"dataset's resolution, {odd} px, which is not a multiple of {mult}"):
        db(toy, ds.with_options(resolution=odd), prior_preservation=True)  # before any picture is generated
    _, none, _ = db(toy, ds, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="full mode"):
        FT_SaveLoRA().execute(none, "x")


def test_full_model_saves_as_a_diffusers_folder_that_loads_back(toy, folders):
    from comfyui_finetune.nodes.io import FT_SaveCheckpoint
    from comfyui_finetune.nodes.models import FT_LoadBaseModel

    tuned, _, _ = db(toy, stars(), steps=2, batch_size=2)
    out = FT_SaveCheckpoint().execute(tuned, "db/full", "diffusers folder", "fp32")
    (name,) = out["result"]
    assert name == "db/full" and FT_SaveCheckpoint().execute(tuned, "db/full", "diffusers folder",
                                                             "fp32")["result"][0] == "db/full_00001"
    (back,) = FT_LoadBaseModel().execute(f"diffusers/{name}", "cpu", "fp32")
    with torch.inference_mode(False):
        assert torch.equal(sampling.sample(back, "a sks star", seeds=[3], steps=5),
                           sampling.sample(tuned, "a sks star", seeds=[3], steps=5))
    with pytest.raises(ValueError, match="single-file checkpoint is written for Stable Diffusion 1.x, Stable "
                                         "Diffusion 2.x and Stable Diffusion XL models; this is the built-in toy"):
        FT_SaveCheckpoint().execute(tuned, "db/x", "single file (.safetensors)", "fp16")


@pytest.mark.slow
def test_pivotal_tuning_learns_lora_and_embedding_that_reload_together(toy, judge, folders):
    from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_ApplyLoRA, FT_SaveEmbedding

    tuned, lora, log, emb = db(toy, stars(), instance_prompt="a <pv> star", mode="lora", learning_rate=2e-3,
                               steps=300, pivotal_tuning=True, embedding_lr=2e-2)
    concept = rate(tuned, judge, "a <pv> star", "purple", "star")
    print(f"pivotal tuning: 'a <pv> star' as a purple star {concept:.2f}")
    assert concept >= 0.8 and emb.token == "<pv>" and log.config["recipe"]["pivotal_tuning"]
    (lname,) = FT_SaveLoRA().execute(lora, "pv/lora")["result"]
    (ename,) = FT_SaveEmbedding().execute(emb, "pv/embedding")["result"]
    (rebuilt,) = FT_ApplyEmbedding().execute(toy, ename, "<pv>")
    (rebuilt,) = FT_ApplyLoRA().execute(rebuilt, lname, 1.0)
    with torch.inference_mode(False):
        a = sampling.sample(tuned, "a <pv> star", seeds=[1, 2], steps=10)
        b = sampling.sample(rebuilt, "a <pv> star", seeds=[1, 2], steps=10)
    assert float((a - b).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="'sks' is already a word the model knows"):
        db(toy, stars(), mode="lora", pivotal_tuning=True, steps=1)
    with pytest.raises(ValueError, match="pivotal_tuning needs mode 'lora'"):
        db(toy, stars(), instance_prompt="a <pv> star", mode="full", pivotal_tuning=True, steps=1)


def test_dreambooth_with_prior_preservation_resumes_bit_exact(toy, folders, monkeypatch, press_cancel_at):
    from comfyui_finetune.nodes import host

    kw = dict(prior_preservation=True, num_class_images=4, steps=4, batch_size=2, mode="lora", learning_rate=1e-3)
    _, straight, _ = db(toy, stars(), run_name="db-straight", **kw)

    press_cancel_at(2)
    with pytest.raises(host.Interrupted, match="cancelled at step 2"):
        db(toy, stars(), run_name="db-stopped", **kw)
    monkeypatch.undo()
    _, resumed, log = db(toy, stars(), resume_run="db-stopped", **kw)
    assert log.resumed_from == 2
    assert all(torch.equal(straight.state[k], resumed.state[k]) for k in straight.state)
