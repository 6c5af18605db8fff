"""ControlNet on the toy world: the shipped one is followed, strength 0 is no control, training raises adherence,
resume is exact, files round-trip in both layouts, and mismatches and bad input get clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes import host
from comfyui_finetune.nodes.controlnet import (FT_ApplyControlNet, FT_CannyEdges, FT_LoadControlNet,
                                               FT_SaveControlNet)
from comfyui_finetune.nodes.sample import FT_Sample
from comfyui_finetune.nodes.train import FT_TrainControlNet
from comfyui_finetune.trainers.adapters.controlnet import apply as A
from comfyui_finetune.trainers.adapters.controlnet import value as C
from comfyui_finetune.trainers.adapters.controlnet import files as F
from comfyui_finetune.trainers.methods import controlnet as T
from comfyui_finetune.trainers.data.dataset import Dataset, Example
from comfyui_finetune.trainers.toy import control

TOY = "toy canny (built-in)"


@pytest.fixture(scope="module")
def toy_cn():
    with torch.inference_mode(False):
        return FT_LoadControlNet().execute(TOY)[0]


def target_condition(k=0):
    c, s, img, mask = control.targets(k + 1)[k]
    cond = FT_CannyEdges().execute(torch.from_numpy(img).float()[None] / 255, **control.CANNY)[0]
    return f"a {c} {s}", cond, mask


def sample_node(model, prompt, control_=None, seed=7, batch=1, **kw):
    args = dict(negative_prompt="", seed=seed, steps=20, cfg=4.0, sampler="ddim", width=0, height=0,
                batch_size=batch)
    args.update(kw)
    return FT_Sample().execute(model, prompt, control=control_, **args)[0]


def apply(cn, image, strength=1.0, start=0.0, end=1.0, previous=None):
    return FT_ApplyControlNet().execute(cn, image, strength, start, end, previous)[0]


def test_toy_controlnet_puts_the_shape_where_the_edges_are(toy, toy_cn):
    with torch.inference_mode(False):
        r = control.adherence(toy, toy_cn, n=16)
    print(f"mask IoU with the toy ControlNet: mean {r['mean_control']}, share >= 0.6: {r['share_control_ge_0.6']}; "
          f"same prompts without control: mean {r['mean_none']}")
    assert r["share_control_ge_0.6"] >= 0.8
    assert r["mean_none"] <= 0.3


def test_strength_zero_and_an_empty_range_are_exactly_no_control(toy, toy_cn):
    prompt, cond, _ = target_condition()
    free = sample_node(toy, prompt, batch=2)
    assert torch.equal(sample_node(toy, prompt, apply(toy_cn, cond, 0.0), batch=2), free)
    assert torch.equal(sample_node(toy, prompt, apply(toy_cn, cond, 1.0, 0.0, 0.0), batch=2), free)
    assert not torch.equal(sample_node(toy, prompt, apply(toy_cn, cond, 1.0), batch=2), free)


def test_a_fresh_controlnet_changes_nothing(toy):
    """Zero-initialised output convolutions: before training, a ControlNet is exactly no control."""
    with torch.inference_mode(False):
        fresh = C.new_controlnet(toy)
    prompt, cond, _ = target_condition()
    assert torch.equal(sample_node(toy, prompt, apply(fresh, cond)), sample_node(toy, prompt))


def test_chained_controls_add_up(toy, toy_cn):
    """Two applications at 0.5 each give what one gives at 1.0: residuals are summed, scaled by strength."""
    prompt, cond, _ = target_condition(1)
    one = sample_node(toy, prompt, apply(toy_cn, cond, 1.0))
    two = sample_node(toy, prompt, apply(toy_cn, cond, 0.5, previous=apply(toy_cn, cond, 0.5)))
    assert float((one - two).abs().max()) < 1e-3
    late = sample_node(toy, prompt, apply(toy_cn, cond, 1.0, 0.5, 1.0))
    assert float((late - one).abs().max()) > 0.05, "acting only in the second half must change the picture"


def test_resize_modes():
    img = torch.zeros(1, 16, 32, 3)
    img[:, :, :8] = 1.0  # left quarter white
    crop = A.fit_condition(img, 32, 32, "crop")  # cover: 64 wide, centre-crop drops the white quarter
    fit = A.fit_condition(img, 32, 32, "fit")  # letterbox: 32x16 picture in the middle, black bars
    stretch = A.fit_condition(img, 32, 32, "stretch")
    assert crop.shape == fit.shape == stretch.shape == (1, 3, 32, 32)
    assert float(crop[..., 2:].max()) < 0.01  # (the first column keeps a little of the filter's bleed)
    assert float(fit[0, 0, :8].max()) == 0.0 and float(fit[0, 0, 16, :6].min()) > 0.99
    assert float(stretch[0, 0, :, :6].min()) > 0.99 and float(stretch[0, 0, :, 10:].max()) < 0.01
    with pytest.raises(ValueError, match="resize_mode 'zoom' is not known"):
        A.fit_condition(img, 32, 32, "zoom")


def test_bad_control_inputs_name_the_problem(toy, toy_cn):
    prompt, cond, _ = target_condition()
    with pytest.raises(ValueError, match="start_percent 0.8 must not exceed end_percent 0.2"):
        apply(toy_cn, cond, 1.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="image must be an IMAGE batch.*MASK"):
        apply(toy_cn, cond[..., 0], 1.0)
    with pytest.raises(ValueError, match="3 condition images for 2 generated images"):
        sample_node(toy, prompt, apply(toy_cn, cond.repeat(3, 1, 1, 1)), batch=2)


def test_a_controlnet_for_another_family_names_both(toy, folders):
    from diffusers import ControlNetModel

    cfg = dict(toy_cn_config())
    cfg["cross_attention_dim"] = 1024  # an SD 2.x width on the toy's blocks
    with torch.inference_mode(False):
        other = C.ControlNet(ControlNetModel.from_config(cfg), "sd2-edges")
    _, cond, _ = target_condition()
    with pytest.raises(ValueError, match=r"'sd2-edges' is a ControlNet for Stable Diffusion 2.x.*model 'toy' is "
                                         r"built-in toy model"):
        sample_node(toy, "a red circle", apply(other, cond))
    # a broken SDXL file is refused when loading, naming the layout it is not
    from safetensors.torch import save_file

    (folders["models"] / "controlnet").mkdir()
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3),
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048)},
              str(folders["models"] / "controlnet" / "xl.safetensors"))
    with pytest.raises(ValueError, match=r"xl does not match the Stable Diffusion XL \(cross-attention "
                                         r"width 2048\) ControlNet layout: \d+ weights missing"):
        FT_LoadControlNet().execute("xl.safetensors")
    (folders["models"] / "controlnet" / "old.pth").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="only .safetensors ControlNets are loaded"):
        FT_LoadControlNet().execute("old.pth")
    save_file({"foo.weight": torch.zeros(2)}, str(folders["models"] / "controlnet" / "lora.safetensors"))
    with pytest.raises(ValueError, match="not a ControlNet"):
        FT_LoadControlNet().execute("lora.safetensors")
    with pytest.raises(ValueError, match="must be a name relative to its folder"):
        FT_LoadControlNet().execute("../escape.safetensors")


def toy_cn_config():
    from comfyui_finetune.trainers.toy.loader import WEIGHTS

    return json.loads((WEIGHTS / "controlnet" / "config.json").read_text())


def test_save_and_load_both_layouts(toy_cn, folders):
    names = {}
    for layout in ("original", "diffusers"):
        out = FT_SaveControlNet().execute(toy_cn, "mine/edges", layout, "fp32")
        names[layout] = out["result"][0]
    assert names == {"original": "mine/edges.safetensors", "diffusers": "mine/edges_00001.safetensors"}
    ref = toy_cn.net.state_dict()
    from safetensors import safe_open

    with safe_open(str(folders["models"] / "controlnet" / names["original"]), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert all(k.startswith("control_model.") for k in keys)
    assert {"control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.weight", "control_model.time_embed.0.weight"} <= keys
    assert meta["finetune_layout"] == "original" and json.loads(meta[F.CONFIG_KEY])["cross_attention_dim"] == 64
    # a diffusers folder (config.json + weights written by diffusers itself) is listed by its weights file
    toy_cn.net.save_pretrained(str(folders["models"] / "controlnet" / "from_diffusers"), safe_serialization=True)
    names["diffusers folder"] = "from_diffusers/diffusion_pytorch_model.safetensors"
    for layout, name in names.items():
        back = FT_LoadControlNet().execute(name)[0]
        got = back.net.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), layout


def test_original_layout_reads_in_diffusers_from_single_file(folders):
    """The original-layout mapping checked against diffusers' own converter, on the real SD 1.5 architecture."""
    from diffusers import ControlNetModel

    from comfyui_finetune.trainers.families.registry import FAMILIES

    with torch.inference_mode(False):
        torch.manual_seed(0)
        net = ControlNetModel.from_config(json.loads((FAMILIES["sd15"].config_dir / "controlnet" /
                                                      "config.json").read_text()))
        for p in net.parameters():  # zero convs are zero at init: make every weight distinct
            p.data.normal_(0, 0.02)
        cn = C.ControlNet(net, "random sd15")
        path = F.save(cn, folders["models"] / "controlnet", "sd15", "original", "fp16")
        theirs = ControlNetModel.from_single_file(str(path), config=str(FAMILIES["sd15"].config_dir),
                                                  subfolder="controlnet", local_files_only=True)
        ours = F.load_file(path)
    ref = {k: v.half().float() for k, v in net.state_dict().items()}
    for other in (theirs.state_dict(), ours.net.state_dict()):
        assert other.keys() == ref.keys()
        bad = [k for k in ref if not torch.equal(other[k].float(), ref[k])]
        assert not bad, bad[:5]


def broad_set(n=64, seed=3, caption_dropout=0.0):
    pics = control.training_pictures(n, seed)
    return Dataset([Example(p.image, p.caption, f"{i}.png") for i, p in enumerate(pics)], name="broad",
                   caption_dropout=caption_dropout)


def train_node(model, dataset, **kw):
    args = dict(preprocessor="canny", steps=150, learning_rate=1e-3, batch_size=8, seed=0, caption_dropout=0.3,
                run_name="cn", low_threshold=0.1, high_threshold=0.2)
    args.update(kw)
    return FT_TrainControlNet().execute(model, dataset, **args)


@pytest.mark.slow
def test_training_from_the_unet_raises_adherence(toy, folders):
    with torch.inference_mode(False):
        fresh = C.new_controlnet(toy)
        before = control.adherence(toy, fresh, n=12)
    cn, log = train_node(toy, broad_set(256))
    with torch.inference_mode(False):
        after = control.adherence(toy, cn, n=12)
    print(f"mask IoU from the UNet init: before {before['mean_control']} (share >= 0.6: "
          f"{before['share_control_ge_0.6']}), after 150 steps {after['mean_control']} "
          f"(share {after['share_control_ge_0.6']})")
    assert before["iou_control"] == before["iou_none"], "a fresh ControlNet must change nothing"
    assert after["mean_control"] >= before["mean_control"] + 0.25
    assert log.steps == 150
    run = folders["output"] / "finetune" / log.run
    assert json.loads((run / "config.json").read_text())["recipe"]["preprocessor"] == "canny"


def test_cancel_and_resume_is_bit_exact(toy, folders, monkeypatch, press_cancel_at):
    ds = broad_set(16)
    kw = dict(steps=6, batch_size=2, caption_dropout=0.5)
    straight, _ = train_node(toy, ds, run_name="straight", **kw)

    press_cancel_at(3)
    with pytest.raises(host.Interrupted, match="cancelled at step 3; resume with resume_run='stopped'"):
        train_node(toy, ds, run_name="stopped", **kw)
    monkeypatch.undo()
    resumed, log = train_node(toy, ds, run_name="ignored", resume_run="stopped", **kw)
    assert log.resumed_from == 3 and log.steps == 6
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_preprocessor_options_fail_before_training(toy, folders):
    with pytest.raises(ValueError, match="low_threshold 0.6 must not exceed high_threshold 0.3"):
        train_node(toy, broad_set(4), low_threshold=0.6, high_threshold=0.3)
    assert not (folders["output"] / "finetune").exists(), "no run folder for a run that cannot start"


def test_paired_conditions_train_and_stay_aligned_under_augmentation(toy, folders):
    from comfyui_finetune.trainers.data.dataset import Augment, pair_conditions
    from comfyui_finetune.trainers.data.augment import augment_batch
    from comfyui_finetune.trainers.data.preprocess import canny

    ds = broad_set(8)
    imgs = torch.from_numpy(np.stack([e.image for e in ds.examples])).float() / 255
    edges = (canny(imgs, **control.CANNY).numpy() * 255).astype(np.uint8)
    conds = Dataset([Example(edges[i], "", f"{i}.jpg") for i in range(8)], name="edges")
    paired = pair_conditions(ds, conds)
    assert all(np.array_equal(e.condition, edges[i]) for i, e in enumerate(paired.examples))
    cn, log = train_node(toy, ds, conditions=conds, steps=2, batch_size=2)
    assert log.steps == 2 and "paired" in json.dumps(log.config)
    with pytest.raises(ValueError, match="no condition image named like 1 training picture"):
        pair_conditions(ds, Dataset(conds.examples[:7], name="edges"))
    # flip and crop move a picture and its condition together; colour jitter touches only the picture
    px = torch.from_numpy(np.stack([e.image for e in ds.examples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    cond = torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(0)
    apx, acond = augment_batch(px, Augment(flip=1.0, crop_scale=1.0, color_jitter=0.0), g, condition=cond)
    assert torch.allclose(acond, cond.flip(-1)) and torch.allclose(apx, px.flip(-1), atol=1e-6)
    jpx, jcond = augment_batch(px, Augment(flip=0.0, crop_scale=1.0, color_jitter=0.5), g, condition=cond)
    assert torch.equal(jcond, cond) and float((jpx - px).abs().max()) > 0.05


def test_node_lists_match_the_library():
    from comfyui_finetune.nodes.sample import RESIZE_MODES
    from comfyui_finetune.trainers.data.preprocess import PREPROCESSORS

    assert FT_TrainControlNet.INPUT_TYPES()["required"]["preprocessor"][0] == list(PREPROCESSORS)
    assert tuple(RESIZE_MODES) == A.RESIZE_MODES


def test_sampling_in_another_precision_leaves_the_controlnet_alone(toy, toy_cn):
    """ComfyUI caches node outputs: a bf16 model samples with a converted copy, never the ControlNet itself."""
    prompt, cond, _ = target_condition()
    with torch.inference_mode(False):
        low = toy.clone().to("cpu", torch.bfloat16)
    before = {k: v.clone() for k, v in toy_cn.net.state_dict().items()}
    img = sample_node(low, prompt, apply(toy_cn, cond), steps=4)
    assert img.shape == (1, 32, 32, 3) and img.dtype == torch.float32
    after = toy_cn.net.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)


def test_validation_samples_use_the_training_condition(toy, folders):
    from PIL import Image

    from comfyui_finetune.trainers.loop.training import train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir

    method = T.ControlNetMethod("canny", control.CANNY)
    cfg = TrainConfig(steps=2, batch_size=2, learning_rate=1e-3, validation_prompt="a red circle", validation_every=2,
                      validation_images=1)
    run = RunDir.create(folders["output"], "validated")
    train(toy.clone(), broad_set(8), method, cfg, run)
    assert [p.name for p in (run.path / "samples").glob("*.png")] == ["step-2-0.png"]
    (ctl,) = method.sample_kwargs()["controls"]
    assert ctl.control_net is method.cn and ctl.image.shape == (1, 32, 32, 3)
    assert set(ctl.image.unique().tolist()) <= {0.0, 1.0}, "the condition is a binary Canny map"

    # bucketed pictures: the validation picture is drawn at its condition's size, not stretched to a square
    tall = Dataset([Example(np.ascontiguousarray(p.image[:, 8:24]), p.caption, f"{i}.png")
                    for i, p in enumerate(control.training_pictures(4, 3))], name="tall", resolution=24,
                   bucketing=True)
    method = T.ControlNetMethod("canny", control.CANNY)
    run = RunDir.create(folders["output"], "validated-tall")
    train(toy.clone(), tall, method, cfg, run)
    (ctl,) = method.sample_kwargs()["controls"]
    _, h, w, _ = ctl.image.shape
    assert h > w
    assert Image.open(run.path / "samples" / "step-2-0.png").size == (w, h)
