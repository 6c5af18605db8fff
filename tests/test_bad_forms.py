"""Pictures, captions and names in the forms people have, and numbers given on the command line: each awkward but
valid file loads right (the caption text exactly, the picture's pixels and size), and each that cannot is named in a
warning or an error with what was wrong and the fix. A 0 on the command line is a value, checked like any other."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from comfyui_finetune.__main__ import main
from comfyui_finetune.nodes.datasets import FT_LoadImageDataset
from comfyui_finetune.trainers.data import dataset as data

PACK = Path(__file__).resolve().parent.parent
NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
RED = (200, 30, 40)


def picture(path: Path, color=RED, size=(6, 4), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def warnings_of(ds) -> str:
    return "\n".join(ds.warnings)


# ------------------------------------------------------------------------------------------------- pictures --
@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff", ".tga", ".ppm", ".qoi", ".gif", ".BMP", ".TIF"])
def test_lossless_formats_load_with_their_exact_pixels(suffix, tmp_path):
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None or fmt not in Image.SAVE:  # QOI: Pillow writes it from 11 on (the oldest declared is 10.1)
        pytest.skip(f"this Pillow cannot write {suffix} pictures for the test")
    picture(tmp_path / f"p{suffix}")
    (ex,) = data.load_folder(tmp_path, caption="a photo").examples
    assert ex.image.shape == (4, 6, 3) and ex.image.dtype == np.uint8
    assert (ex.image == np.array(RED, np.uint8)).all()


@pytest.mark.parametrize("suffix", [".gif", ".tiff"])
def test_an_animation_or_multi_page_file_gives_its_first_frame_and_says_so(suffix, tmp_path):
    frames = [Image.new("RGB", (6, 4), c) for c in (RED, (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / f"anim{suffix}", save_all=True, append_images=frames[1:])
    ds = data.load_folder(tmp_path, caption="a photo")
    assert (ds.examples[0].image == np.array(RED, np.uint8)).all()
    assert f"anim{suffix} has 3 frames" in warnings_of(ds) and "the first is used" in warnings_of(ds)
    assert "save the frame you want as PNG" in warnings_of(ds)


def test_a_16_bit_greyscale_tiff_is_scaled_to_8_bits(tmp_path):
    arr = np.zeros((4, 6), np.uint16)
    arr[:, 3:] = 65535
    Image.fromarray(arr).save(tmp_path / "deep.tif")
    img = data.load_folder(tmp_path, caption="x").examples[0].image
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[0, 5]) == (255, 255, 255)


def test_a_cmyk_tiff_is_converted_to_rgb(tmp_path):
    picture(tmp_path / "print.tif", (0, 0, 0, 0), mode="CMYK")  # no ink: white paper
    assert tuple(data.load_folder(tmp_path, caption="x").examples[0].image[0, 0]) == (255, 255, 255)


def test_a_transparent_tga_is_composited_on_white_and_its_alpha_is_the_mask(tmp_path):
    img = Image.new("RGBA", (6, 4), (*RED, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.save(tmp_path / "cut.tga")
    (ex,) = data.load_folder(tmp_path, caption="x").examples
    assert tuple(ex.image[0, 0]) == (255, 255, 255) and tuple(ex.image[0, 1]) == RED
    assert ex.mask[0, 0] == 0 and ex.mask[0, 1] == 255


def test_the_exif_orientation_of_a_camera_picture_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: shown rotated a quarter turn clockwise
    Image.new("RGB", (20, 10), RED).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert data.load_folder(tmp_path, caption="x").examples[0].image.shape == (20, 10, 3)


@pytest.mark.skipif(not features.check_module("avif") if "avif" in features.modules else True,
                    reason="this Pillow has no AVIF")
def test_an_avif_loads_where_pillow_reads_it(tmp_path):
    picture(tmp_path / "new.avif", size=(16, 8))
    img = data.load_folder(tmp_path, caption="x").examples[0].image
    assert img.shape == (8, 16, 3) and abs(int(img[4, 8, 0]) - RED[0]) < 24


@pytest.mark.skipif(importlib.util.find_spec("pillow_heif") is not None, reason="pillow-heif is installed")
def test_a_heic_without_its_plugin_is_named_with_the_fix_and_the_rest_loads(tmp_path):
    picture(tmp_path / "p0.png")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    ds = data.load_folder(tmp_path, caption="x")
    assert [e.name for e in ds.examples] == ["p0.png"]
    assert "IMG_0001.HEIC (HEIC is not read here: pip install pillow-heif" in warnings_of(ds)


def test_a_folder_of_formats_not_read_here_is_an_error_naming_each_and_its_fix(tmp_path):
    (tmp_path / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (tmp_path / "layers.psd").write_bytes(b"8BPS" + bytes(22))
    with pytest.raises(ValueError, match=r"no usable image .*2 picture\(s\) in a format not read here: "
                                         r"layers.psd \(Photoshop .*export it as PNG.*logo.svg \(SVG .*export it"):
        data.load_folder(tmp_path, caption="x")


# ------------------------------------------------------------------------------------------------- captions --
CAPTION = "un café, 猫 ☕ — “quoted”"


@pytest.mark.parametrize("codec, bom", [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
                                        ("utf-8", b"\xef\xbb\xbf"), ("utf-32-le", b"\xff\xfe\x00\x00")],
                         ids=["notepad-unicode", "utf16-be", "utf8-bom", "utf32"])
def test_captions_with_a_byte_order_mark_read_exactly(codec, bom, tmp_path, caplog):
    picture(tmp_path / "p0.png")
    (tmp_path / "p0.txt").write_bytes(bom + (CAPTION + "\r\n").encode(codec))
    ds = data.load_folder(tmp_path)
    assert ds.examples[0].caption == CAPTION and not ds.warnings and "p0.txt" not in caplog.text


def test_utf16_without_a_byte_order_mark_is_read_and_named_in_a_warning(tmp_path):
    picture(tmp_path / "p0.png")
    (tmp_path / "p0.txt").write_bytes("a photo of a sks café".encode("utf-16-le"))
    ds = data.load_folder(tmp_path)
    assert ds.examples[0].caption == "a photo of a sks café"
    assert "caption file p0.txt has no byte-order mark" in warnings_of(ds) and "UTF-16 LE" in warnings_of(ds)
    assert "save it as UTF-8" in warnings_of(ds)


def test_a_windows_1252_caption_with_curly_quotes_is_read_and_named_in_a_warning(tmp_path):
    picture(tmp_path / "p0.png")
    (tmp_path / "p0.txt").write_bytes("“a dog’s toy” – café".encode("cp1252"))
    ds = data.load_folder(tmp_path)
    assert ds.examples[0].caption == "“a dog’s toy” – café"
    assert "caption file p0.txt is not UTF-8" in warnings_of(ds) and "Windows-1252" in warnings_of(ds)
    assert "save it as UTF-8" in warnings_of(ds)


def test_a_caption_with_zero_bytes_is_an_error_naming_the_file(tmp_path):
    picture(tmp_path / "p0.png")
    (tmp_path / "p0.txt").write_bytes(b"a\x00dog")
    with pytest.raises(ValueError, match=r"caption file p0.txt holds zero bytes .* save it as UTF-8"):
        data.load_folder(tmp_path)


def test_a_whitespace_caption_is_named_and_the_caption_input_used(tmp_path, caplog):
    picture(tmp_path / "p0.png")
    picture(tmp_path / "p1.png")
    (tmp_path / "p0.txt").write_text(" \n\t\u00a0\n")
    (tmp_path / "p1.txt").write_text("a sks dog")
    ds = data.load_folder(tmp_path, caption="a photo of {token}", token="zwx")
    assert [e.caption for e in ds.examples] == ["a photo of zwx", "a sks dog"]
    assert "1 caption(s) hold only whitespace and count as none: p0.txt" in warnings_of(ds)
    assert "write the caption in, or delete the file" in warnings_of(ds) and "p0.txt" in caplog.text


def test_a_whitespace_caption_without_a_caption_input_is_an_error_naming_both_files(folders):
    picture(folders["input"] / "blank" / "p0.png")
    (folders["input"] / "blank" / "p0.txt").write_bytes("\ufeff \u200b\r\n".encode("utf-8"))
    with pytest.raises(ValueError, match=r"1 image\(s\) in 'blank' have no caption \(p0.png; 1 caption\(s\) hold "
                                         r"only whitespace: p0.txt\): add name.txt .* or set the caption input"):
        FT_LoadImageDataset().execute("blank", "", "sks")


def test_a_whitespace_caption_file_gives_way_to_the_metadata_row(tmp_path):
    picture(tmp_path / "p0.png")
    (tmp_path / "p0.txt").write_text("   ")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "p0.png", "text": "from the metadata"}\n')
    ds = data.load_folder(tmp_path)
    assert ds.examples[0].caption == "from the metadata" and "p0.txt" in warnings_of(ds)


def test_a_utf16_metadata_csv_from_a_spreadsheet_is_read(tmp_path):
    picture(tmp_path / "p0.png")
    (tmp_path / "metadata.csv").write_bytes("file_name,text\r\np0.png,\"naïve, 猫\"\r\n".encode("utf-16"))
    assert data.load_folder(tmp_path).examples[0].caption == "naïve, 猫"


# ---------------------------------------------------------------------------------------------------- names --
def test_a_macos_nfd_picture_name_matches_its_nfc_metadata_row(tmp_path):
    picture(tmp_path / f"{NFD}.png")
    (tmp_path / "metadata.jsonl").write_text(f'{{"file_name": "{NFC}.png", "text": "a cup"}}\n', encoding="utf-8")
    ds = data.load_folder(tmp_path)
    assert ds.examples[0].caption == "a cup" and not ds.warnings


def test_an_nfc_picture_name_matches_an_nfd_csv_row_in_a_subfolder(tmp_path):
    picture(tmp_path / "sub" / f"{NFC}.png")
    (tmp_path / "metadata.csv").write_text(f"file_name,text\nsub/{NFD}.png,a cup\n", encoding="utf-8")
    assert data.load_folder(tmp_path).examples[0].caption == "a cup"


def test_an_nfd_picture_finds_its_nfc_caption_file_and_it_is_no_orphan(tmp_path):
    picture(tmp_path / f"{NFD}.png")
    (tmp_path / f"{NFC}.txt").write_text("a cup of coffee", encoding="utf-8")
    ds = data.load_folder(tmp_path)
    assert ds.examples[0].caption == "a cup of coffee" and ds.examples[0].name == f"{NFC}.png"
    assert not ds.warnings


def test_an_nfc_picture_finds_its_nfd_mask_file(tmp_path):
    picture(tmp_path / f"{NFC}.png")
    mask = Image.new("L", (6, 4), 0)
    mask.putpixel((5, 3), 255)
    mask.save(tmp_path / f"{NFD}.mask.png")
    (ex,) = data.load_folder(tmp_path, caption="x").examples
    assert ex.mask is not None and ex.mask[3, 5] == 255 and ex.mask[0, 0] == 0


def test_the_node_finds_a_folder_macos_named_in_nfd_by_its_nfc_name(folders):
    picture(folders["input"] / NFD / "p0.png")
    (ds,) = FT_LoadImageDataset().execute(NFC, "a photo", "sks")
    assert len(ds.examples) == 1 and ds.examples[0].caption == "a photo"


def test_conditions_pair_with_pictures_whose_names_differ_only_in_normalisation(tmp_path):
    picture(tmp_path / "pics" / f"{NFC}.png")
    picture(tmp_path / "cond" / f"{NFD}.jpg", (0, 0, 0))
    paired = data.pair_conditions(data.load_folder(tmp_path / "pics", caption="x"),
                                  data.load_folder(tmp_path / "cond", caption="x"))
    assert paired.examples[0].condition is not None and paired.examples[0].condition.max() < 30


# ------------------------------------------------------------------------------------------------ the shell --
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: 0 is out of range: give a whole number from 1 to 1000000"),
    (["--steps", "-3"], "argument --steps: -3 is out of range: give a whole number from 1 to 1000000"),
    (["--stop-after", "0"], "argument --stop-after: 0 is out of range: give a whole number from 1 to"),
    (["--stop-after", "2.5"], "argument --stop-after: '2.5' is not a whole number: give one from 1 to"),
    (["--run-name", ""], "argument --run-name: '' is empty: give a name, or leave the flag out"),
], ids=["steps0", "steps-negative", "stop-after0", "stop-after-fraction", "run-name-empty"])
def test_train_flags_take_0_as_a_value_and_name_the_range(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "config.json"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_empty_folder_flag_of_the_runner_is_an_error_not_the_current_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path / "wf.json"), "--input", ""])
    assert "argument --input: '' is empty" in capsys.readouterr().err


def test_a_benchmark_peak_of_0_is_refused_not_read_as_not_given():
    out = subprocess.run([sys.executable, str(PACK / "benchmarks" / "train_step.py"), "--peak-tflops", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "argument --peak-tflops: 0 is out of range: give a number above 0" in out.stderr
