"""Datasets: captions from every source, every image mode, bad folders, buckets, augmentation, preview."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_finetune.nodes.datasets import (FT_Augment, FT_DatasetFromImages, FT_DatasetPreview,
                                             FT_LoadImageDataset)
from comfyui_finetune.trainers.data import dataset as data


def _png(path, color=(200, 30, 30), size=(40, 32), mode="RGB"):
    Image.new(mode, size, color if mode != "L" else 128).save(path)


def test_captions_from_txt_metadata_and_template(folders):
    d = folders["input"] / "set"
    d.mkdir()
    for n in "abcd":
        _png(d / f"{n}.png")
    (d / "a.txt").write_text("caption from txt\n")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from jsonl"}) + "\n")
    ds = FT_LoadImageDataset().execute("set", "a photo of {token}", "zwx", repeats=3)[0]
    caps = {e.name: e.caption for e in ds.examples}
    assert caps == {"a.png": "caption from txt", "b.png": "from jsonl", "c.png": "a photo of zwx",
                    "d.png": "a photo of zwx"}
    assert len(ds) == 12 and ds.examples[0].image.shape == (32, 40, 3)


def test_metadata_csv(tmp_path):
    _png(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,\"a red, square thing\"\n")
    assert data.load_folder(tmp_path).examples[0].caption == "a red, square thing"


def test_every_image_mode_is_converted(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "transparent.png")  # composited on white
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "web.webp")
    ds = data.load_folder(tmp_path, caption="x")
    got = {e.name: e.image for e in ds.examples}
    assert all(im.shape == (8, 8, 3) and im.dtype == np.uint8 for im in got.values())
    assert tuple(got["transparent.png"][0, 0]) == (255, 255, 255)
    assert tuple(got["grey.png"][0, 0]) == (77, 77, 77)
    assert tuple(got["deep.png"][0, 0]) == (255, 255, 255)
    assert got["print.jpg"][0, 0, 0] > 200 and got["print.jpg"][0, 0, 1] < 60  # red
    assert got["web.webp"][0, 0, 2] > 200


def test_unreadable_file_is_skipped_with_a_warning(tmp_path, caplog):
    _png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with caplog.at_level(logging.WARNING):
        ds = data.load_folder(tmp_path, caption="x")
    assert [e.name for e in ds.examples] == ["good.png"]
    assert "broken.png" in caplog.text


def test_bad_folders_are_clear_errors(folders):
    (folders["input"] / "empty").mkdir()
    (folders["input"] / "corrupt").mkdir()
    (folders["input"] / "corrupt" / "a.png").write_bytes(b"nope")
    (folders["input"] / "nocap").mkdir()
    _png(folders["input"] / "nocap" / "a.png")
    node = FT_LoadImageDataset()
    with pytest.raises(ValueError, match=r"'empty' has no usable image \(no image files\); accepted formats: .png"):
        node.execute("empty", "x", "")
    with pytest.raises(ValueError, match=r"'corrupt' has no usable image \(1 unreadable file\(s\): a.png\)"):
        node.execute("corrupt", "x", "")
    with pytest.raises(ValueError, match="have no caption .*set the caption input"):
        node.execute("nocap", "", "")
    with pytest.raises(ValueError, match="without '..'"):
        node.execute("../outside", "x", "")
    assert FT_LoadImageDataset.INPUT_TYPES()["required"]["folder"][0] == ["corrupt", "empty", "nocap"]


def test_dataset_from_images_and_mismatched_captions():
    imgs = torch.rand(3, 16, 16, 3)
    ds = FT_DatasetFromImages().execute(imgs, "one\ntwo\nthree", repeats=2)[0]
    assert [e.caption for e in ds.examples] == ["one", "two", "three"] and len(ds) == 6
    assert FT_DatasetFromImages().execute(imgs, "same for all")[0].examples[2].caption == "same for all"
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        FT_DatasetFromImages().execute(imgs, "one\ntwo")


def test_buckets_keep_aspect_and_no_upscale():
    assert data.bucket_for(300, 600, 32, 4, False) == (20, 44)
    assert data.bucket_for(100, 100, 32, 4, False) == (32, 32)
    assert data.bucket_for(16, 16, 32, 4, True) == (16, 16)
    wide = data.Dataset([data.Example(np.zeros((30, 60, 3), np.uint8), "w", "w"),
                         data.Example(np.zeros((64, 64, 3), np.uint8), "s", "s")], bucketing=True)
    prep = data.prepare(wide, 32, 4)
    assert set(prep.pixels) == {(20, 44), (32, 32)}
    square = data.prepare(wide.with_options(bucketing=False), 32, 4)
    assert set(square.pixels) == {(32, 32)}


def test_caption_shuffle_keeps_leading_tokens_and_dropout():
    g = torch.Generator().manual_seed(0)
    outs = {data.process_caption("sks, red, round, big", shuffle=True, keep=1, dropout=0.0, generator=g)
            for _ in range(30)}
    assert len(outs) > 2 and all(o.startswith("sks, ") for o in outs)
    drops = [data.process_caption("x", shuffle=False, keep=0, dropout=0.5, generator=g) for _ in range(200)]
    assert 60 < drops.count("") < 140


def test_augment_is_seeded():
    from comfyui_finetune.trainers.data.augment import augment_batch

    ds = FT_Augment().execute(FT_DatasetFromImages().execute(torch.rand(2, 16, 16, 3), "x")[0], 0.5, 0.6, 0.2)[0]
    px = torch.rand(4, 3, 16, 16) * 2 - 1
    a = augment_batch(px, ds.augment, torch.Generator().manual_seed(1))
    b = augment_batch(px, ds.augment, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, px) and a.shape == px.shape
    with pytest.raises(ValueError, match="crop_scale"):
        FT_Augment().execute(ds, 0.5, 0.0, 0.0)


def test_preview_is_an_image():
    ds = FT_DatasetFromImages().execute(torch.rand(5, 16, 24, 3), "a caption that is rather long indeed")[0]
    (img,) = FT_DatasetPreview().execute(ds, 16, 64)
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and 0 <= img.min() and img.max() <= 1
