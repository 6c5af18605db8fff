"""Sound <-> picture conversion (trainers/audio): the IMAGE/AUDIO contract, pitch through each preset, long sounds
cut into pictures and joined back without clicks at their exact length, Riffusion's picture formula recomputed
here in numpy, the resampler's frequency keeping and anti-aliasing, and no torchaudio or librosa anywhere.

Pitch here is a plain spectral peak (zero-padded FFT, parabolic interpolation on the log magnitude): enough for a
single sine. The toy audio judge is the measuring one."""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfyui_finetune.trainers.audio.resample import resample
from comfyui_finetune.trainers.audio.spectrogram import (CHANNELS, JOINS, PRESET_NAMES, PRESETS, Preset, hz_to_mel,
                                                         is_stereo, mel_filterbank, mel_pseudo_inverse, mel_to_hz,
                                                         to_audio, to_pictures)

TOY, RIFF = "toy_8k_64mel", "riffusion_44k_512mel"
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(round(rate * seconds)), dtype=torch.float64) / rate
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def peak_hz(y: torch.Tensor, rate: int) -> float:
    """The strongest frequency of ``y``: Hann window, 16x zero-padded FFT, parabola through the log peak."""
    y = y.double().cpu() - y.double().mean()
    n = y.numel()
    mag = torch.fft.rfft(y * torch.hann_window(n, periodic=False, dtype=torch.float64), n=16 * n).abs()
    k = int(mag[1:-1].argmax()) + 1
    a, b, c = (math.log(float(mag[i]) + 1e-300) for i in (k - 1, k, k + 1))
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / (16 * n)


def cents(f: float, ref: float) -> float:
    return 1200 * math.log2(f / ref)


def rms(y: torch.Tensor) -> float:
    return float(y.double().pow(2).mean().sqrt())


def test_presets_are_documented_and_exact():
    assert PRESET_NAMES == (TOY, RIFF) and set(PRESETS) == set(PRESET_NAMES)
    assert CHANNELS == ("mono mix", "left", "right", "stereo") and JOINS == ("concatenate", "batch")
    toy, riff = PRESETS[TOY], PRESETS[RIFF]
    assert (toy.sample_rate, toy.n_fft, toy.win_length, toy.hop) == (8000, 512, 512, 128)
    assert (toy.n_mels, toy.frames, toy.mel_scale, toy.mapping, toy.loud_dark) == (64, 64, "htk", "db", False)
    assert (toy.f_min, toy.f_max, toy.window_samples) == (60.0, 2000.0, 8192)
    assert (riff.sample_rate, riff.n_fft, riff.win_length, riff.hop) == (44100, 17640, 4410, 441)
    assert (riff.n_mels, riff.f_min, riff.f_max, riff.mel_scale, riff.mel_norm) == (512, 0.0, 10000.0, "htk", None)
    assert (riff.power, riff.max_value, riff.loud_dark, riff.frames) == (0.25, 30e6, True, 512)
    assert riff.window_samples / riff.sample_rate == pytest.approx(5.12)  # 512 px = 5.12 s
    source = inspect.getsource(Preset)
    undocumented = [f.name for f in dataclasses.fields(Preset)
                    if not re.search(rf"\n    {f.name}: [^\n]*\n    \"\"\"\S", source)]
    assert not undocumented  # each field has a docstring under it
    with pytest.raises(ValueError, match="known"):
        to_pictures(tone(440, 8000, 0.1), 8000, "no_such_preset")


def test_mel_scales_and_filterbanks():
    f = torch.tensor([0.0, 700.0, 1000.0, 6400.0], dtype=torch.float64)
    assert hz_to_mel(f, "htk").tolist() == pytest.approx([0.0, 2595 * math.log10(2), 2595 * math.log10(17 / 7),
                                                          2595 * math.log10(1 + 6400 / 700)])
    assert hz_to_mel(f, "slaney").tolist() == pytest.approx([0.0, 10.5, 15.0, 42.0])  # 3f/200, then 27 per x6.4
    for scale in ("htk", "slaney"):
        assert mel_to_hz(hz_to_mel(f, scale), scale).tolist() == pytest.approx(f.tolist())
    fb = mel_filterbank(TOY)
    assert fb.shape == (64, 257) and float(fb.max()) <= 1.0 and bool((fb.sum(1) > 0).all())
    assert float(fb[:, :4].abs().max()) == 0.0 and float(fb[:, 128:].abs().max()) == 0.0  # 60-2000 Hz only
    assert torch.allclose(fb @ mel_pseudo_inverse(TOY), torch.eye(64, dtype=fb.dtype), atol=1e-9)
    slaney = dataclasses.replace(PRESETS[TOY], name="slaney test", mel_scale="slaney", mel_norm="slaney",
                                 n_fft=4096, win_length=4096)
    area = mel_filterbank(slaney).sum(1) * 8000 / 4096  # unit-area triangles: weights x bin width ~ 1
    assert area.min() > 0.9 and area.max() < 1.1


def test_contract_shapes_types_channels_and_seeds():
    rate = 22050
    left, right = tone(330, rate, 1.5), tone(660, rate, 1.5, 0.2)
    stereo = torch.stack([left, right])
    want_len = math.ceil(stereo.shape[-1] * 8000 / rate)
    pics = {}
    for ch in CHANNELS:
        p, length = to_pictures(stereo, rate, TOY, channels=ch)
        assert type(length) is int and length == want_len
        assert p.shape == (2, 64, 64, 3) and p.dtype == torch.float32  # ceil(12000 / 8192) = 2 pictures
        assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0 and float(p.max()) > 0.5
        pics[ch] = p
    for ch in ("mono mix", "left", "right"):
        assert torch.equal(pics[ch][..., 0], pics[ch][..., 1]) and torch.equal(pics[ch][..., 0], pics[ch][..., 2])
        assert not is_stereo(pics[ch])
    st = pics["stereo"]
    assert float(st[..., 0].abs().max()) == 0.0 and is_stereo(st)
    assert torch.allclose(st[..., 1], pics["left"][..., 0]) and torch.allclose(st[..., 2], pics["right"][..., 0])
    assert not torch.allclose(st[..., 1], st[..., 2], atol=0.05)

    mono = to_audio(pics["mono mix"], TOY, iterations=8, length=want_len)
    assert mono.shape == (1, want_len) and mono.dtype == torch.float32
    two = to_audio(st, TOY, iterations=8, length=want_len)
    assert two.shape == (2, want_len)  # left and right stay apart (swapped they would be 1200 cents off)
    assert abs(cents(peak_hz(two[0, 1000:-1000], 8000), 330)) < 50
    assert abs(cents(peak_hz(two[1, 1000:-1000], 8000), 660)) < 50
    batch = to_audio(st, TOY, iterations=4, join="batch")
    assert batch.shape == (2, 2, 8192) and batch.dtype == torch.float32
    seeded = [to_audio(pics["left"], TOY, iterations=4, seed=seed) for seed in (7, 7, 8)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    with pytest.raises(ValueError):
        to_audio(pics["left"][:, :32], TOY)
    with pytest.raises(ValueError):
        to_audio(pics["left"], TOY, join="glue")
    with pytest.raises(ValueError):
        to_pictures(stereo, rate, TOY, channels="surround")


def test_silence_and_loudness_survive_the_toy_preset():
    black, length = to_pictures(torch.zeros(1, 4000), 8000, TOY)
    assert length == 4000 and float(black.abs().max()) == 0.0
    assert float(to_audio(black, TOY, iterations=2).abs().max()) == 0.0
    white, _ = to_pictures(torch.zeros(1, 4000), 8000, RIFF)
    assert float(white.min()) == 1.0  # Riffusion: loud = dark, so silence is white
    levels = {}
    for amp in (0.5, 0.05):
        pics, length = to_pictures(tone(440, 8000, 1.0, amp), 8000, TOY)
        back = to_audio(pics, TOY, iterations=16, length=length)[0, 800:-800]
        levels[amp] = rms(back) / rms(tone(440, 8000, 1.0, amp))
    assert 0.5 < levels[0.5] < 2.0 and 0.5 < levels[0.05] < 2.0  # within 6 dB of the input level, at both levels
    assert levels[0.05] / levels[0.5] == pytest.approx(1.0, abs=0.25)  # a tone 20 dB quieter comes back 20 dB quieter


@pytest.mark.parametrize("preset, rate, seconds, iterations", [(TOY, 16000, 1.0, 32), (RIFF, 48000, 2.0, 2)],
                         ids=["toy", "riffusion"])
def test_a_440_hz_tone_comes_back_within_20_cents(preset, rate, seconds, iterations):
    """Resampled on the way in; Riffusion's 400 ms FFT is slow on a CPU, and 2 iterations already keep the pitch."""
    pics, length = to_pictures(tone(440, rate, seconds), rate, preset)
    assert pics.shape[0] == 1
    out = to_audio(pics, preset, iterations=iterations, length=length)
    sr = PRESETS[preset].sample_rate
    assert out.shape == (1, length) and length == round(seconds * sr)
    middle = out[0, int(0.1 * sr): -int(0.1 * sr)]
    assert rms(middle) > 0.05
    assert abs(cents(peak_hz(middle, sr), 440)) < 20


def _join_jumps(y: torch.Tensor, step: int, n: int, reach: int) -> tuple[float, float]:
    """(largest sample-to-sample jump within ``reach`` of an inner join, largest one elsewhere in the middle)."""
    d = (y[1:] - y[:-1]).abs()
    near = torch.zeros_like(d, dtype=torch.bool)
    for i in range(1, n):
        near[i * step - reach: i * step + reach] = True
    inner = torch.zeros_like(near)
    inner[step // 2: (n - 1) * step + step // 2] = True
    return float(d[near].max()), float(d[inner & ~near].max())


def test_a_10_s_sound_is_cut_into_pictures_and_joined_back_at_its_length_without_clicks():
    rate, seconds = 8000, 10.0
    y = tone(330, rate, seconds, 0.4) + tone(660, rate, seconds, 0.1)
    pics, length = to_pictures(y, rate, TOY)
    assert length == 80000 and pics.shape[0] == math.ceil(10 * 8000 / 8192) == 10
    out = to_audio(pics, TOY, iterations=16, length=length)
    assert out.shape == (1, 80000)
    near, elsewhere = _join_jumps(out[0], 8192, 10, 512)
    print("largest jump near joins / elsewhere:", near, elsewhere)
    assert near <= 1.05 * elsewhere, (near, elsewhere)
    # the measure sees clicks: the same windows rebuilt apart and butted together jump at the joins
    butted = to_audio(pics, TOY, iterations=8, join="batch").permute(1, 0, 2).reshape(1, -1)
    near_b, elsewhere_b = _join_jumps(butted[0], 8192, 10, 512)
    print("butted:", near_b, elsewhere_b)
    assert near_b > 1.3 * elsewhere_b, (near_b, elsewhere_b)
    assert abs(cents(peak_hz(out[0, 4000:-4000], rate), 330)) < 20


def _htk_mel_matrix(sr: int, n_fft: int, n_mels: int, f_lo: float, f_hi: float) -> np.ndarray:
    """Triangles peaking at 1 on n_mels + 2 HTK-mel-spaced points (numpy, one band at a time)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    pts = 700.0 * (10.0 ** (np.linspace(mel(f_lo), mel(f_hi), n_mels + 2) / 2595.0) - 1.0)
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    return np.stack([np.interp(freqs, pts[m: m + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0) for m in range(n_mels)])


def test_the_riffusion_picture_is_riffusions_formula():
    """1 - (mel / max) ** 0.25, low frequencies at the bottom, mono in R = G = B: recomputed here with numpy's FFT
    and a mel matrix of its own, from the 100 ms Hann window centred in a 400 ms FFT every 10 ms (reflect padding)."""
    sr, n_fft, win, hop, n = 44100, 17640, 4410, 441, 512
    t = np.arange(n * hop) / sr
    rng = np.random.default_rng(0)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t) * (t > 2) \
        + 0.02 * rng.standard_normal(t.size) * np.exp(-t)
    pics, length = to_pictures(torch.tensor(x, dtype=torch.float32), sr, RIFF)
    assert pics.shape == (1, 512, 512, 3) and length == n * hop
    padded = np.pad(x.astype(np.float32).astype(np.float64), n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2: (n_fft - win) // 2 + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n]
    mag = np.abs(np.fft.rfft(frames * window, axis=-1)).T  # [freq, time]
    mel = _htk_mel_matrix(sr, n_fft, 512, 0.0, 10000.0) @ mag
    want = (1.0 - (mel / mel.max()) ** 0.25)[::-1]
    got = pics[0].double().numpy()
    assert np.abs(got[..., 0] - want).max() * 255 <= 1.0
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])
    row_440 = int(np.argmin(got[:, 100, 0]))  # darkest = loudest; 440 Hz sits in the lower part of 0-10 kHz
    assert row_440 > 400


def test_resample_keeps_frequencies_and_removes_what_would_alias():
    x = tone(1000, 44100, 1.0)
    y = resample(x, 44100, 8000)
    assert y.shape == (8000,) and y.dtype == torch.float32
    assert abs(cents(peak_hz(y[400:-400], 8000), 1000)) < 1
    assert rms(y[400:-400]) == pytest.approx(rms(x), rel=0.01)
    high = tone(5000, 16000, 1.0)
    folded = resample(high, 16000, 8000)
    assert 20 * math.log10(rms(folded[400:-400]) / rms(high)) <= -40  # would come back at 3 kHz if aliased
    assert torch.equal(resample(x, 44100, 44100), x)
    assert resample(torch.zeros(2, 3, 1001), 48000, 44100).shape == (2, 3, math.ceil(1001 * 44100 / 48000))
    odd = resample(tone(1000, 8001, 1.0), 8001, 8000)  # gcd 1: the gathered path
    assert odd.shape == (8000,) and abs(cents(peak_hz(odd[400:-400], 8000), 1000)) < 1
    up = resample(tone(440, 8000, 0.5), 8000, 44100)
    assert up.shape == (22050,) and abs(cents(peak_hz(up[2000:-2000], 44100), 440)) < 1


def test_no_torchaudio_or_librosa_or_scipy_is_imported():
    code = ("import sys\n"
            "for m in ('torchaudio', 'librosa', 'scipy'):\n"
            "    sys.modules[m] = None\n"
            "import torch\n"
            "from comfyui_finetune.trainers.audio import spectrogram\n"
            "pics, n = spectrogram.to_pictures(torch.zeros(800), 8000, 'toy_8k_64mel')\n"
            "spectrogram.to_audio(pics, 'toy_8k_64mel', iterations=1)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.cuda
@NO_GPU
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_cuda_follows_the_input_and_matches_the_cpu(preset):
    sr = PRESETS[preset].sample_rate
    x = torch.stack([tone(440, 16000, 2.0), tone(550, 16000, 2.0)])
    cpu, length = to_pictures(x, 16000, preset, channels="stereo")
    gpu, length_gpu = to_pictures(x.cuda(), 16000, preset, channels="stereo")
    assert gpu.device.type == "cuda" and length_gpu == length
    assert (gpu.cpu() - cpu).abs().max() < 2 / 255
    out = to_audio(gpu, preset, iterations=8, length=length)
    assert out.device.type == "cuda" and out.shape == (2, length)
    assert abs(cents(peak_hz(out[0, sr // 10: -sr // 10], sr), 440)) < 20
