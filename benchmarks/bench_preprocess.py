"""ControlNet preprocessor time per 512x512 picture (prints numbers; not a test).

    python benchmarks/bench_preprocess.py [--device cpu|cuda] [--batch 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=whole(1), default=4)
    ap.add_argument("--repeats", type=whole(1), default=5)
    args = ap.parse_args()

    from comfyui_finetune.trainers.data import preprocess as pp

    img = torch.rand(args.batch, 512, 512, 3, generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch} of 512x512")
    for name, fn in (("canny", lambda x: pp.canny(x, 0.4, 0.8)), ("soft_edges", pp.soft_edges),
                     ("scribble", lambda x: pp.scribble(x, 0.3, 3)), ("tile_blur", lambda x: pp.tile_blur(x, 4.0, 1.0)),
                     ("grayscale", pp.grayscale)):
        fn(img)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn(img)
            if args.device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        print(f"{name:11s}: {1000 * best / args.batch:7.1f} ms per picture")


if __name__ == "__main__":
    main()
