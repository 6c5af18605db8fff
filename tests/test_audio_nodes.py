"""The audio nodes as ComfyUI calls them: AUDIO and IMAGE contracts, datasets of sound from folders and from the
graph, the toy sound world and the judge node; nothing needs torchaudio or librosa."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from comfyui_finetune.nodes.audio import (FT_AudioToSpectrogram, FT_DatasetFromAudio, FT_JudgeAudio,
                                          FT_LoadAudioDataset, FT_SpectrogramToAudio, FT_ToyAudioDataset)
from comfyui_finetune.trainers.audio import names, spectrogram, world
from comfyui_finetune.trainers.audio.files import read_audio, write_wav


def _tone(hz: float, seconds: float, rate: int = 8000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    ramp = np.minimum(1, np.minimum(t, t[-1] - t) / 0.01)
    return np.repeat((0.5 * np.sin(2 * np.pi * hz * t) * ramp)[None], channels, 0).astype(np.float32)


def test_menus_are_the_librarys_own():
    assert names.PRESET_NAMES == spectrogram.PRESET_NAMES
    assert names.CHANNELS == spectrogram.CHANNELS
    assert names.JOINS == spectrogram.JOINS


def test_audio_to_pictures_and_back_keeps_comfyuis_types_and_the_length():
    wave = torch.from_numpy(_tone(262, 2.5, 16000, channels=2))[None]  # as Load Audio gives it: 16 kHz stereo
    images, length = FT_AudioToSpectrogram().execute({"waveform": wave, "sample_rate": 16000}, "toy_8k_64mel",
                                                     "mono mix")
    assert images.dtype == torch.float32 and images.shape == (3, 64, 64, 3)  # 2.5 s at 8 kHz = 3 windows of 8192
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert isinstance(length, int) and length == 20000
    (audio,) = FT_SpectrogramToAudio().execute(images, "toy_8k_64mel", 16, 0, "concatenate", length)
    assert set(audio) == {"waveform", "sample_rate"} and type(audio["sample_rate"]) is int
    assert audio["sample_rate"] == 8000
    w = audio["waveform"]
    assert w.dtype == torch.float32 and w.ndim == 3 and w.shape == (1, 1, 20000)
    from comfyui_finetune.trainers.audio.judge import judge_clip

    assert judge_clip(w[0, 0].numpy(), 8000).note == "c"
    (batch,) = FT_SpectrogramToAudio().execute(images, "toy_8k_64mel", 4, 0, "batch", 0)
    assert batch["waveform"].shape == (3, 1, 8192)


def test_bad_audio_names_the_input():
    with pytest.raises(ValueError, match="audio: expected ComfyUI's AUDIO"):
        FT_AudioToSpectrogram().execute(torch.zeros(1, 1, 100), "toy_8k_64mel", "mono mix")
    with pytest.raises(ValueError, match="images: expected an IMAGE"):
        FT_SpectrogramToAudio().execute(torch.zeros(64, 64), "toy_8k_64mel", 4, 0, "batch", 0)


def test_toy_audio_dataset_plays_what_it_says_and_the_judge_node_hears_it():
    ds, images, audio = FT_ToyAudioDataset().execute("d", "square", "twice", 4, "a sks tone", 3)
    assert len(ds.examples) == 4 and {e.caption for e in ds.examples} == {"a sks tone"}
    assert images.shape == (4, 64, 64, 3) and ds.examples[0].image.dtype == np.uint8
    assert audio["sample_rate"] == world.SAMPLE_RATE and audio["waveform"].shape == (1, 1, 4 * world.CLIP_LENGTH)
    clips = audio["waveform"][0, 0].reshape(4, world.CLIP_LENGTH)[:, None]
    out = FT_JudgeAudio().execute({"waveform": clips, "sample_rate": world.SAMPLE_RATE}, "d", "square", "twice")
    report, note_acc, timbre_acc, rhythm_acc, cents = out["result"]
    assert (note_acc, timbre_acc, rhythm_acc) == (1.0, 1.0, 1.0) and 0 <= cents < 10
    assert "clip 4: note d" in report and out["ui"]["text"] == [report]
    wrong = FT_JudgeAudio().execute({"waveform": clips, "sample_rate": world.SAMPLE_RATE}, "g",
                                    FT_JudgeAudio.INPUT_TYPES()["required"]["timbre"][0][0], "steady")["result"]
    assert wrong[1] == 0.0 and wrong[2] == -1.0 and wrong[3] == 0.0


def test_toy_audio_dataset_any_uses_only_what_the_base_model_knows():
    ds, _, _ = FT_ToyAudioDataset().execute(names.ANY, names.ANY, names.ANY, 24, "a {timbre} tone at {note}", 0)
    words = {w for e in ds.examples for w in e.caption.split()}
    assert not words & {names.NEW_NOTES[0], *names.NEW_TIMBRES}
    assert len({e.caption for e in ds.examples}) > 3


def test_load_audio_dataset_cuts_long_files_reads_captions_and_skips_broken_ones(folders):
    root = folders["input"] / "tones"
    root.mkdir()
    write_wav(root / "long.wav", _tone(349, 10.0), 8000)
    (root / "long.txt").write_text("a sine tone at f", encoding="utf-16")
    write_wav(root / "short.wav", _tone(196, 0.5, 22050, channels=2), 22050)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    (ds,) = FT_LoadAudioDataset().execute("tones", "toy_8k_64mel", "a {token} sound", "sks", "mono mix")
    long = [e for e in ds.examples if e.name.startswith("long.wav")]
    assert len(long) == 10 and {e.caption for e in long} == {"a sine tone at f"}  # ceil(80000 / 8192)
    assert [e.caption for e in ds.examples if e.name == "short.wav"] == ["a sks sound"]
    assert any("broken.wav" in w for w in ds.warnings)
    ui = FT_LoadAudioDataset().load("tones", "toy_8k_64mel", "a {token} sound", "sks", "mono mix")["ui"]
    assert "broken.wav" in ui["text"][0]


def test_load_audio_dataset_says_what_it_looked_for(folders):
    (folders["input"] / "empty").mkdir()
    (folders["input"] / "empty" / "notes.txt").write_text("no sound here")
    with pytest.raises(ValueError, match=r"folder: .*'empty' has no usable sound file \(no file ending in \.wav"):
        FT_LoadAudioDataset().execute("empty", "toy_8k_64mel", "a sks sound", "sks", "mono mix")
    (folders["input"] / "bare").mkdir()
    write_wav(folders["input"] / "bare" / "x.wav", _tone(196, 0.3), 8000)
    with pytest.raises(ValueError, match="have no caption .*x.wav"):
        FT_LoadAudioDataset().execute("bare", "toy_8k_64mel", "", "sks", "mono mix")


def test_dataset_from_audio_gives_every_window_of_every_clip_its_caption():
    w = torch.from_numpy(np.stack([_tone(262, 1.5), _tone(466, 1.5)]))
    (ds,) = FT_DatasetFromAudio().execute({"waveform": w, "sample_rate": 8000}, "one\ntwo", "toy_8k_64mel",
                                          "mono mix")
    assert [e.caption for e in ds.examples] == ["one", "one", "two", "two"]
    with pytest.raises(ValueError, match="captions: 3 captions for 2 clips"):
        FT_DatasetFromAudio().execute({"waveform": w, "sample_rate": 8000}, "a\nb\nc", "toy_8k_64mel", "mono mix")


def test_wav_files_round_trip_at_every_sample_width(tmp_path):
    import wave

    x = _tone(440, 0.2, 8000, channels=2)
    for width in (1, 2, 3, 4):
        path = tmp_path / f"w{width}.wav"
        scale = {1: 127, 2: 32767, 3: 8388607, 4: 2147483647}[width]
        ints = np.round(x.T * scale).astype(np.int64)
        if width == 1:
            raw = (ints + 128).astype(np.uint8).tobytes()
        else:
            raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.ravel())
        with wave.open(str(path), "wb") as f:
            f.setnchannels(2), f.setsampwidth(width), f.setframerate(8000), f.writeframes(raw)
        got, rate = read_audio(path)
        assert rate == 8000 and got.shape == x.shape
        assert np.abs(got - x).max() < 2.0 / min(scale, 32767), width


def test_nothing_imports_torchaudio_or_librosa():
    code = ("import sys; sys.modules['torchaudio'] = None; sys.modules['librosa'] = None\n"
            "import torch\n"
            "from comfyui_finetune.nodes.audio import FT_ToyAudioDataset, FT_SpectrogramToAudio\n"
            "ds, imgs, audio = FT_ToyAudioDataset().execute('g', 'sine', 'steady', 1, 'a tone', 0)\n"
            "out = FT_SpectrogramToAudio().execute(imgs, 'toy_8k_64mel', 2, 0, 'batch', 0)[0]\n"
            "assert out['waveform'].shape == (1, 1, 8192)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
