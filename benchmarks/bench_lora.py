"""LoRA training speed and memory on the toy model (prints numbers; not a test).

    python benchmarks/bench_lora.py [--device cpu|cuda] [--steps 60] [--batch-size 4] [--model toy|toy_audio]

Measures seconds per optimizer step with latents cached once (the default when the dataset has no
augmentation) and encoded every step (what augmentation forces), and the peak memory of each run.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
from pathlib import Path


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=whole(1), default=60)
    ap.add_argument("--batch-size", type=whole(1), default=4)
    ap.add_argument("--model", default="toy", choices=["toy", "toy_audio"],
                    help="toy: 32 px pictures; toy_audio: the toy audio model's 64 x 64 spectrograms of tones")
    args = ap.parse_args()
    os.environ.setdefault("FT_NO_PROGRESS", "1")

    from comfyui_finetune.trainers.data.dataset import Augment
    from comfyui_finetune.trainers.loop.training import train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir
    from comfyui_finetune.trainers.methods.lora import LoRAMethod
    from comfyui_finetune.trainers.toy.loader import load_toy_audio_model, load_toy_model
    from comfyui_finetune.nodes.audio import FT_ToyAudioDataset
    from comfyui_finetune.nodes.datasets import FT_ToyDataset

    if args.model == "toy_audio":
        base = load_toy_audio_model(device=args.device)
        ds = FT_ToyAudioDataset().execute("d", "sine", "steady", 16, "a sks tone", 0)[0]
    else:
        base = load_toy_model(device=args.device)
        ds = FT_ToyDataset().execute("purple", "star", 16, "a sks star", 0, "narrow")[0]
    identity = Augment(flip=0.0, crop_scale=1.0, color_jitter=0.0)  # forces per-step encoding, changes nothing
    print(f"model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.steps} steps, LoRA rank 8 attention+feedforward")
    with tempfile.TemporaryDirectory() as tmp:
        for label, data in (("latents cached", ds), ("encoded every step", ds.with_options(augment=identity))):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            cfg = TrainConfig(steps=args.steps, learning_rate=1e-3, batch_size=args.batch_size)
            t = time.perf_counter()
            res = train(base.share(), data, LoRAMethod(8, 8.0, "attention+feedforward"), cfg,
                        RunDir.create(Path(tmp), "bench"))
            total = time.perf_counter() - t
            steady = sorted(r["seconds"] for r in res.log[5:])
            median = steady[len(steady) // 2]
            print(f"{label:20s}: {1000 * median:7.1f} ms/step median ({total:.1f}s total incl. setup), "
                  f"peak memory {peak_mb(args.device):.0f} MiB")


if __name__ == "__main__":
    main()
