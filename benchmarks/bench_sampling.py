"""Sampling speed of the toy model (prints numbers; not a test).

    python benchmarks/bench_sampling.py [--device cpu|cuda] [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=whole(1), default=20)
    ap.add_argument("--repeats", type=whole(1), default=3)
    args = ap.parse_args()

    from comfyui_finetune.trainers.sampling import SAMPLERS, sample
    from comfyui_finetune.trainers.toy.loader import load_toy_model

    t0 = time.perf_counter()
    model = load_toy_model(device=args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, load {time.perf_counter() - t0:.2f}s")
    for sampler in SAMPLERS:
        for batch in (1, 8, 32):
            sample(model, "a red circle", seeds=list(range(batch)), steps=2, sampler=sampler)  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                sample(model, "a red circle", seeds=list(range(batch)), steps=args.steps, cfg=4.0, sampler=sampler)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            print(f"{sampler:16s} batch {batch:3d}: {best:6.3f}s per batch, {1000 * best / batch:7.1f} ms per image "
                  f"({args.steps} steps, cfg 4)")


if __name__ == "__main__":
    main()
