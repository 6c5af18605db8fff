"""ControlNet costs on the toy model (prints numbers; not a test).

Sampling time per denoising step with 0, 1 and 2 ControlNets (DDIM, CFG 4, so every step runs each network on a
batch of 2 x images), and the training time per step of the ControlNet trainer.

    python benchmarks/bench_controlnet.py [--device cpu|cuda] [--batch 8] [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=whole(1), default=8)
    ap.add_argument("--steps", type=whole(1), default=20)
    ap.add_argument("--repeats", type=whole(1), default=3)
    ap.add_argument("--train-steps", type=whole(1), default=30)
    args = ap.parse_args()

    import tempfile
    from pathlib import Path

    from comfyui_finetune.trainers.adapters.controlnet.apply import Control
    from comfyui_finetune.trainers.methods.controlnet import ControlNetMethod
    from comfyui_finetune.trainers.data.dataset import Dataset, Example
    from comfyui_finetune.trainers.loop.training import train
    from comfyui_finetune.trainers.config.recipes import TrainConfig
    from comfyui_finetune.trainers.runs.run_dir import RunDir
    from comfyui_finetune.trainers.data.preprocess import canny
    from comfyui_finetune.trainers.sampling import sample
    from comfyui_finetune.trainers.toy import control
    from comfyui_finetune.trainers.toy.loader import load_toy_controlnet, load_toy_model

    dev = torch.device(args.device)
    model = load_toy_model(device=dev)
    cn = load_toy_controlnet()
    cn.net.to(dev)
    pics = control.training_pictures(args.batch, 0)
    imgs = torch.from_numpy(__import__("numpy").stack([p.image for p in pics])).float() / 255
    cond = canny(imgs, **control.CANNY)
    seeds = list(range(args.batch))
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps, "
          "DDIM, CFG 4")
    base = None
    for n in (0, 1, 2):
        controls = [Control(cn, cond, 1.0 / max(n, 1)) for _ in range(n)]
        sample(model, "a red circle", seeds=seeds, steps=2, controls=controls)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            sample(model, "a red circle", seeds=seeds, steps=args.steps, controls=controls)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        per_step = 1000 * best / args.steps
        base = base or per_step
        print(f"{n} ControlNet(s): {per_step:7.1f} ms per step ({per_step / base:.2f}x), "
              f"{1000 * best / args.batch:7.1f} ms per image")

    ds = Dataset([Example(p.image, p.caption, f"{i}.png") for i, p in
                  enumerate(control.training_pictures(256, 1))], caption_dropout=0.3)
    with tempfile.TemporaryDirectory() as tmp:
        method = ControlNetMethod("canny", control.CANNY)
        t = time.perf_counter()
        r = train(model.share(), ds, method, TrainConfig(steps=args.train_steps, learning_rate=1e-3, batch_size=16),
                  RunDir.create(Path(tmp), "bench"))
        total = time.perf_counter() - t
    steady = sorted(row["seconds"] for row in r.log[5:])
    print(f"ControlNet training, batch 16: median {1000 * steady[len(steady) // 2]:.1f} ms per step "
          f"({args.train_steps} steps in {total:.1f} s with set-up)")


if __name__ == "__main__":
    main()
