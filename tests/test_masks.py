"""Masked loss: masks are read (alpha channel, name.mask.png, a MASK input), move with their pictures through
buckets, crops and flips, survive the run's dataset snapshot, and weight the loss: with unmasked_weight 0 nothing
outside the mask changes the gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_finetune.trainers.data.augment import augment_batch
from comfyui_finetune.trainers.data.dataset import Augment, Dataset, Example, load_folder, prepare
from comfyui_finetune.trainers.data.masks import attach, latent_weights, weighted_mean


def test_outside_the_mask_nothing_changes_the_gradient():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1.0  # latent cells 2..5 x 1..4 are fully inside, the rest fully outside
    w = latent_weights(mask, (8, 8), unmasked_weight=0.0)

    def grad(tgt):
        pred = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        per = torch.nn.functional.mse_loss(pred, tgt, reduction="none")
        weighted_mean(per, w).mean().backward()
        return pred.grad

    a = grad(target)
    outside = (w == 0).expand_as(target)
    changed = target.clone()
    changed[outside] = torch.randn(int(outside.sum()), generator=g) * 10
    b = grad(changed)
    assert torch.equal(a, b), "a target outside the mask changed the gradient"
    assert torch.all(a[outside] == 0) and torch.any(a[~outside] != 0)
    # the floor gives the outside its weight back
    w_half = latent_weights(mask, (8, 8), unmasked_weight=0.25)
    assert float(w_half.min()) == 0.25 and float(w_half.max()) == 1.0


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_a_picture_masked_out_entirely_does_not_train(toy, tmp_path, method):
    """DreamBooth too: it captions each subject's pictures with the subject's instance prompt, masks kept."""
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.trainers.methods.dreambooth import Subject, train_dreambooth
    from comfyui_finetune.trainers.methods.lora import train_lora
    from comfyui_finetune.trainers.config.recipes import DreamBoothRecipe, LoRARecipe
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    def train(ds, run):
        if method == "lora":
            return train_lora(LoRARecipe(steps=4, batch_size=2, learning_rate=1e-3, seed=0, rank=4), toy, ds, run)
        recipe = DreamBoothRecipe(steps=4, batch_size=2, learning_rate=1e-3, seed=0, rank=4, mode="lora",
                                  prior_preservation=False, instance_prompt="a sks star", class_prompt="a star")
        return train_dreambooth(recipe, toy, [Subject(ds, "a sks star", "a star")], run)

    base = FT_ToyDataset().execute("purple", "star", 4, "a sks star", 0, "narrow")[0]
    noise = np.random.default_rng(0).integers(0, 256, base.examples[0].image.shape, dtype=np.uint8)

    def with_first(img):
        first = Example(img, base.examples[0].caption, "first", mask=np.zeros(img.shape[:2], np.uint8))
        return base.with_options(examples=[first] + base.examples[1:])

    results = []
    for name, ds in (("star", with_first(base.examples[0].image)), ("noise", with_first(noise))):
        with torch.inference_mode(False):
            t = train(ds, RunDir.create(tmp_path, name))
        results.append(t.result.state)
    a, b = results
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a), "a masked-out picture changed the LoRA"


def square_picture(h=32, w=48):
    """White picture with a red square; its mask is the square."""
    img = np.full((h, w, 3), 255, np.uint8)
    img[8:20, 10:22] = (255, 0, 0)
    mask = np.zeros((h, w), np.uint8)
    mask[8:20, 10:22] = 255
    return img, mask


def test_the_mask_moves_with_its_picture_through_buckets_crops_and_flips():
    img, mask = square_picture()
    ds = Dataset([Example(img, "a red square", "sq", mask=mask)], bucketing=True, resolution=32)
    p = prepare(ds, 32, 8)
    (b,) = p.masks
    px, m = p.pixels[b], p.masks[b]
    assert m.shape[-2:] == px.shape[-2:] == b and b != (32, 32)  # a bucket, not a square
    red = (px[:, 0] > 0.3) & (px[:, 1] < -0.3)
    assert red.any() and (red == (m[:, 0] > 0.5)).float().mean() > 0.97  # the same resize and crop (edges blur)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):  # flips and crops, several draws
        out, moved = augment_batch(px, Augment(flip=1.0, crop_scale=0.5), g, condition=m)
        red = (out[:, 0] > 0.3) & (out[:, 1] < -0.3)
        inside = moved[:, 0] > 0.5
        agree = (red == inside).float().mean()
        assert agree > 0.97, f"the mask left its picture: {float(agree):.3f} of pixels agree"


def test_masks_are_read_from_alpha_and_mask_files_and_survive_the_snapshot(tmp_path):
    from comfyui_finetune.trainers.runs.run_dir import read_dataset, save_dataset

    img, mask = square_picture(32, 32)
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(np.dstack([img, mask])).save(folder / "alpha.png")
    Image.fromarray(img).save(folder / "side.png")
    Image.fromarray(255 - mask).save(folder / "side.mask.png")
    Image.fromarray(img).save(folder / "plain.png")
    ds = load_folder(folder, caption="a red square")
    by = {e.name: e for e in ds.examples}
    assert sorted(by) == ["alpha.png", "plain.png", "side.png"]  # the mask file is not a picture
    assert np.array_equal(by["alpha.png"].mask, mask) and np.array_equal(by["side.png"].mask, 255 - mask)
    assert by["plain.png"].mask is None
    assert ds.fingerprint() != ds.with_options(examples=[by["plain.png"]] * 3).fingerprint()
    save_dataset(tmp_path / "snap", ds)
    back, _ = read_dataset(tmp_path / "snap")
    for e, f in zip(ds.examples, back.examples):
        assert (e.mask is None and f.mask is None) or np.array_equal(e.mask, f.mask)
    assert back.fingerprint() == ds.fingerprint()
    Image.fromarray(mask[:16]).save(folder / "plain.mask.png")
    with pytest.raises(ValueError, match="the mask of plain.png is 32x16, the picture 32x32"):
        load_folder(folder, caption="a red square")


def test_a_mask_input_attaches_one_mask_per_picture_or_one_for_all():
    from comfyui_finetune.nodes.datasets import FT_DatasetFromImages

    images = torch.rand(3, 16, 16, 3)
    one = torch.zeros(1, 16, 16)
    one[:, 4:8] = 1
    (ds,) = FT_DatasetFromImages().execute(images, "a thing", masks=one)
    assert all(int(e.mask[5, 0]) == 255 and int(e.mask[0, 0]) == 0 for e in ds.examples)
    with pytest.raises(ValueError, match="masks: 2 masks for 3 pictures"):
        attach(ds, np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="mask 0 is 8x8, its picture 16x16"):
        attach(ds, np.zeros((1, 8, 8)))
