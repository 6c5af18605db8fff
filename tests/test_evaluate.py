"""Evaluation nodes: CLIP-T / CLIP-I agree with direct computation, KID is a correct unbiased estimator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes.evaluate import (FT_CLIPImageSimilarity, FT_CLIPScore, FT_CompareGrid, FT_EvalReport,
                                             FT_KID, FT_LoadCLIPScorer)
from comfyui_finetune.trainers.eval import metrics
from comfyui_finetune.trainers.toy import world
from comfyui_finetune.trainers.toy.loader import WEIGHTS


@pytest.fixture(scope="module")
def scorer():
    return FT_LoadCLIPScorer().execute("toy (built-in)", "cpu")[0]


def pictures(color, shape, n, seed, geometry=world.NARROW):
    rng = np.random.default_rng(seed)
    arr = np.stack([world.random_picture(rng, color=color, shape=shape, geometry=geometry).image for _ in range(n)])
    return torch.from_numpy(arr.astype(np.float32) / 255)


def direct_embeddings(images: torch.Tensor, texts: list[str]):
    """The reference path: transformers' own processor and tokenizer on the same CLIP model."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    model = CLIPModel.from_pretrained(str(WEIGHTS / "clip"), use_safetensors=True).eval()
    proc, tok = CLIPImageProcessor.from_pretrained(str(WEIGHTS / "clip")), CLIPTokenizerFast.from_pretrained(str(WEIGHTS / "clip"))
    u8 = [(im.numpy() * 255).round().astype(np.uint8) for im in images]
    with torch.no_grad():
        i = model.get_image_features(**proc(images=u8, return_tensors="pt"))
        t = model.get_text_features(**tok(texts, padding="max_length", max_length=tok.model_max_length,
                                          return_tensors="pt"))
    i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
    return i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)


def test_scorer_is_loaded_once_per_node():
    node = FT_LoadCLIPScorer()
    assert node.execute("toy (built-in)", "cpu")[0] is node.execute("toy (built-in)", "cpu")[0]


def test_clip_t_matches_direct_computation_and_torchmetrics_formula(scorer):
    imgs = torch.cat([pictures("red", "circle", 3, 0), pictures("blue", "square", 3, 1)])
    prompts = ["a red circle"] * 3 + ["a blue square"] * 3
    mean, per = FT_CLIPScore().execute(scorer, imgs, "\n".join(prompts))["result"]
    i, t = direct_embeddings(imgs, prompts)
    expected = 100 * (i * t).sum(-1).clamp_min(0)  # torchmetrics CLIPScore: 100 * max(cos, 0)
    assert json.loads(per) == pytest.approx(expected.tolist(), abs=1e-4)
    assert mean == pytest.approx(float(expected.mean()), abs=1e-4)


def test_clip_i_matches_direct_computation(scorer):
    gen, ref = pictures("green", "star", 4, 2), pictures("green", "star", 3, 3)
    mean, per = FT_CLIPImageSimilarity().execute(scorer, gen, ref)["result"]
    a, _ = direct_embeddings(gen, ["x"])
    b, _ = direct_embeddings(ref, ["x"])
    assert mean == pytest.approx(float((a @ b.T).mean()), abs=1e-4)
    assert json.loads(per) == pytest.approx((a @ b.T).mean(1).tolist(), abs=1e-4)


def numpy_unbiased_kid(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_matches_a_numpy_reference_on_fixed_features():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g) + 0.3
    value, std, m = metrics.kid(fa, fb, subsets=1, subset_size=12)
    assert m == 12 and std == 0
    assert value == pytest.approx(numpy_unbiased_kid(fa.double().numpy(), fb.double().numpy()), rel=1e-9)
    # subsets of a size that fits: each subset value is the reference estimator on that subset
    _, std, m = metrics.kid(fa, fb[:5], subsets=3, subset_size=1000)
    assert m == 2 and std > 0  # half the smaller set: subsets still differ


def test_kid_near_zero_for_one_distribution_and_positive_for_two(scorer):
    red_a, red_b = pictures("red", "circle", 24, 10, world.BROAD), pictures("red", "circle", 24, 11, world.BROAD)
    blue = pictures("blue", "circle", 24, 12, world.BROAD)
    same, same_std, _ = FT_KID().execute(scorer, red_a, red_b, 50, 1000, 0)["result"]
    diff, diff_std, info = FT_KID().execute(scorer, red_a, blue, 50, 1000, 0)["result"]
    print(f"CLIP-KID same distribution {same:.4f} ± {same_std:.4f}; red vs blue {diff:.4f} ± {diff_std:.4f}")
    assert abs(same) <= max(3 * same_std, 0.01)
    assert diff > 10 * max(abs(same), 1e-3) and diff > 3 * diff_std
    assert "CLIP-KID" in info and "24 vs 24" in info and "subsets of 12" in info


def test_right_caption_beats_a_wrong_one_on_generated_pictures(scorer, toy):
    from comfyui_finetune.trainers.sampling import sample

    wins, total = 0, 0
    classes = world.base_classes()
    for k, (c, s) in enumerate(classes):
        with torch.inference_mode(False):
            imgs = sample(toy, f"a {c} {s}", seeds=[7, 8], steps=20)
        wc, ws = classes[(k + 5) % len(classes)]  # another class of the trained ones
        right = metrics.clip_t(scorer, imgs, [f"a {c} {s}"] * 2)
        wrong = metrics.clip_t(scorer, imgs, [f"a {wc} {ws}"] * 2)
        wins += int((right > wrong).sum())
        total += 2
    print(f"right caption scores higher for {wins}/{total} generated pictures")
    assert wins / total >= 0.9


def test_bad_input_is_a_clear_error(scorer):
    imgs = pictures("red", "circle", 2, 0)
    with pytest.raises(ValueError, match="images is an empty batch"):
        FT_CLIPScore().execute(scorer, imgs[:0], "a red circle")
    with pytest.raises(ValueError, match="prompt has 3 lines for 2 images"):
        FT_CLIPScore().execute(scorer, imgs, "a\nb\nc")
    with pytest.raises(ValueError, match="reference_images must be an IMAGE batch.*MASK"):
        FT_CLIPImageSimilarity().execute(scorer, imgs, torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="images_2 has pictures of 64x32, images_1 of 32x32"):
        FT_CompareGrid().execute(imgs, "a\nb", "", "", 64, images_2=torch.rand(2, 32, 64, 3))
    with pytest.raises(ValueError, match="KID needs at least 2 images"):
        FT_KID().execute(scorer, imgs[:1], imgs, 10, 100, 0)


def test_compare_grid_with_clip_t_annotations(scorer):
    a, b = pictures("red", "circle", 3, 0), pictures("blue", "square", 3, 1)
    (grid,) = FT_CompareGrid().execute(a, "red\nblue", "s0\ns1\ns2", "a red circle\na blue square", 96,
                                       images_2=b, scorer=scorer)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[2] > 3 * 96


def test_eval_report_collects_rows(folders):
    node = FT_EvalReport()
    node.execute("sweep", "base", clip_t=21.5, kid=0.12, kid_std=0.01)
    out = node.execute("sweep", "lora-r8", clip_t=27.25, clip_i=0.8, notes="rank 8")
    table = out["result"][0]
    assert "base" in table and "lora-r8" in table and "27.25" in table and "clip_i" in table
    folder = folders["output"] / "finetune" / "reports"
    rows = json.loads((folder / "sweep.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "lora-r8"]
    assert (folder / "sweep.csv").read_text().splitlines()[0].startswith("time,variant,clip_t")
