"""Sound <-> spectrogram-picture conversion speed: seconds of compute per second of audio (prints numbers; not a test).

    python benchmarks/bench_audio_convert.py [--device cpu|cuda] [--seconds 10] [--iterations 32] [--repeats 3]

For each preset, a stereo mix of tones and noise (``--seconds`` long, at the preset's own rate, so no resampling)
goes through ``to_pictures`` (mono mix) and back through ``to_audio`` (``--iterations`` of Griffin-Lim, joined by
crossfade); the best of ``--repeats`` runs after a warm-up (which also builds the mel matrices) is reported. A
separate line times resampling 44.1 kHz -> 8 kHz and 48 kHz -> 44.1 kHz.
"""
from __future__ import annotations

import argparse
import math
import time

import torch


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up: mel matrices, FFT plans, CUDA kernels
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def sound(rate: int, seconds: float, device: str) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    g = torch.Generator().manual_seed(0)
    left = 0.4 * torch.sin(2 * math.pi * 330 * t) + 0.02 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    right = 0.3 * torch.sin(2 * math.pi * 523.25 * t) * (1 + torch.sin(2 * math.pi * 2 * t)) / 2
    return torch.stack([left, right]).float().to(device)


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--iterations", type=whole(0), default=32)
    ap.add_argument("--repeats", type=whole(1), default=3)
    args = ap.parse_args()

    from comfyui_finetune.trainers.audio.resample import resample
    from comfyui_finetune.trainers.audio.spectrogram import PRESETS, to_audio, to_pictures

    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.seconds:g} s of stereo sound, "
          f"{args.iterations} Griffin-Lim iterations")
    for name, preset in PRESETS.items():
        wave = sound(preset.sample_rate, args.seconds, args.device)
        pictures, length = to_pictures(wave, preset.sample_rate, name)
        enc = best_time(lambda: to_pictures(wave, preset.sample_rate, name), args.repeats, args.device)
        dec = best_time(lambda: to_audio(pictures, name, iterations=args.iterations, length=length),
                        args.repeats, args.device)
        print(f"{name:21s}: {pictures.shape[0]:3d} pictures {tuple(pictures.shape[1:3])}; to_pictures "
              f"{enc / args.seconds:7.4f} s/s, to_audio {dec / args.seconds:7.4f} s/s of audio")
    for a, b in ((44100, 8000), (48000, 44100)):
        wave = sound(a, args.seconds, args.device)
        took = best_time(lambda: resample(wave, a, b), args.repeats, args.device)
        print(f"resample {a} -> {b} Hz (2 channels): {took / args.seconds:7.4f} s/s of audio")


if __name__ == "__main__":
    main()
