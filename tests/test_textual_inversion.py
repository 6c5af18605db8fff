"""Textual Inversion on the toy world: only the new word's vectors learn; files load in diffusers too."""
from __future__ import annotations

import pytest
import torch

from comfyui_finetune.nodes import host
from comfyui_finetune.nodes.datasets import FT_ToyDataset
from comfyui_finetune.nodes.io import FT_ApplyEmbedding, FT_SaveEmbedding
from comfyui_finetune.nodes.train import FT_TrainTextualInversion
from comfyui_finetune.trainers.sampling import sample

from test_lora import rate


def yellow_triangles(n=8, caption="a <yt>"):
    # a pairing the base model never saw, of a colour and a shape it can draw: TI can only recombine what the
    # generator already draws (a colour the UNet never saw, like purple, stays out of its reach)
    return FT_ToyDataset().execute("yellow", "triangle", n, caption, 0, "narrow")[0]


def train_ti(model, dataset, **kw):
    args = dict(token="<yt>", init_token="triangle", num_vectors=1, steps=300, learning_rate=2e-2, batch_size=4,
                seed=0, caption_mode="dataset captions", run_name="ti")
    args.update(kw)
    return FT_TrainTextualInversion().execute(model, dataset, **args)


@pytest.mark.slow
def test_ti_learns_the_concept_and_changes_nothing_else(toy, judge, folders):
    base = rate(toy, judge, "a <yt>", "yellow", "triangle")
    tuned, emb, log = train_ti(toy, yellow_triangles())
    after = rate(tuned, judge, "a <yt>", "yellow", "triangle")
    print(f"'a <yt>' shown as a yellow triangle: base {base:.2f}, after Textual Inversion {after:.2f}")
    assert base <= 0.1 and after >= 0.8
    n = toy.text_encoder.get_input_embeddings().weight.shape[0]
    new_w = tuned.text_encoder.get_input_embeddings().weight
    assert new_w.shape[0] == n + 1
    assert torch.equal(new_w[:n], toy.text_encoder.get_input_embeddings().weight), "other rows must not move"
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(toy, name).state_dict()
        for k, v in getattr(tuned, name).state_dict().items():
            if "token_embedding" not in k:
                assert torch.equal(v, ref[k]), f"{name}.{k} changed"
    assert emb.vectors.shape == (1, 64) and log.steps == 300


def test_embedding_file_round_trips_through_the_pack_and_diffusers(toy, folders):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from comfyui_finetune.trainers.model.model import FTModel
    from comfyui_finetune.trainers.toy.loader import WEIGHTS

    tuned, emb, _ = train_ti(toy, yellow_triangles(4), steps=20, num_vectors=2, batch_size=2)
    (name,) = FT_SaveEmbedding().execute(emb, "ti/yt")["result"]
    path = folders["models"] / "embeddings" / name
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_slice("emb_params").get_shape() == [2, 64]
    (ours,) = FT_ApplyEmbedding().execute(toy, name, "<yt>")
    with torch.inference_mode(False):
        trained = sample(tuned, "a <yt>", seeds=[1, 2], steps=10)
        applied = sample(ours, "a <yt>", seeds=[1, 2], steps=10)
        base = sample(toy, "a triangle", seeds=[1, 2], steps=10)
    assert torch.equal(trained, applied)
    assert float((trained - base).abs().max()) > 0.02
    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS / "pipeline"), local_files_only=True)
    pipe.load_textual_inversion(str(path), token="<yt>")
    theirs = FTModel("toy", "diffusers", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                     dict(toy.scheduler_config))
    with torch.inference_mode(False):
        # diffusers spells a 2-vector token "<yt> <yt>_1" itself, as the pack does
        ref = sample(theirs, pipe.maybe_convert_prompt("a <yt>", pipe.tokenizer), seeds=[1, 2], steps=10)
    diff = float((ref - applied).abs().max())
    print(f"max pixel difference, pack vs diffusers load_textual_inversion: {diff:.2e}")
    assert diff < 1e-4


def test_ti_resume_is_bit_exact(toy, folders, monkeypatch, press_cancel_at):
    ds = yellow_triangles(4)
    _, straight, _ = train_ti(toy, ds, steps=4, batch_size=2, run_name="ti-straight")

    press_cancel_at(2)
    with pytest.raises(host.Interrupted, match="cancelled at step 2"):
        train_ti(toy, ds, steps=4, batch_size=2, run_name="ti-stopped")
    monkeypatch.undo()
    _, resumed, log = train_ti(toy, ds, steps=4, batch_size=2, resume_run="ti-stopped")
    assert log.resumed_from == 2 and torch.equal(straight.vectors, resumed.vectors)


def test_bad_ti_input(toy, folders):
    ds = yellow_triangles(2)
    with pytest.raises(ValueError, match="'star' is already a word the model knows"):
        train_ti(toy, ds, token="star")
    with pytest.raises(ValueError, match="init_token 'yellowish' is 4 tokens but num_vectors is 1: .*raise "
                       "num_vectors to 4"):
        train_ti(toy, ds, init_token="yellowish")
    with pytest.raises(ValueError, match="init_token 'yellow triangle' is 2 tokens but num_vectors is 1"):
        train_ti(toy, ds, init_token="yellow triangle")
    with pytest.raises(ValueError, match="init_token is empty"):
        train_ti(toy, ds, init_token=" ")
    with pytest.raises(ValueError, match="no caption of the dataset contains the token '<zz>'"):
        train_ti(toy, ds, token="<zz>")
    with pytest.raises(ValueError, match="num_vectors must be at least 1, got 0"):
        train_ti(toy, ds, num_vectors=0)
    with pytest.raises(ValueError, match="no embedding given"):
        FT_ApplyEmbedding().execute(toy, "none", "")


def test_several_init_words_start_one_vector_each_cycling(toy, folders):
    """init_token 'yellow triangle' with 3 vectors starts them from yellow, triangle, yellow (A1111's
    initialization text does the same); with no step taken they are those rows exactly."""
    _, emb, _ = train_ti(toy, yellow_triangles(2), init_token="yellow triangle", num_vectors=3, steps=1,
                         learning_rate=1e-12, batch_size=2)
    table = toy.text_encoder.get_input_embeddings().weight
    ids = toy.tokenizer("yellow triangle", add_special_tokens=False).input_ids
    want = table[[ids[0], ids[1], ids[0]]]
    assert len(ids) == 2 and not torch.equal(want[0], want[1])
    torch.testing.assert_close(emb.vectors, want, atol=1e-6, rtol=0)
