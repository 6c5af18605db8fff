"""python -m comfyui_finetune.trainers.toy build [--out DIR] [--stages ...] [--seed N]"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path


def main(argv=None) -> int:
    from .build import STAGES, WEIGHTS, BuildConfig, build

    ap = argparse.ArgumentParser(prog="python -m comfyui_finetune.trainers.toy",
                                 description="Train the toy world's models from a seed and print the quality bar.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train judge, VAE, UNet + text encoder, CLIP scorer; then evaluate")
    b.add_argument("--out", type=Path, default=WEIGHTS, help="output folder (default: the shipped weights folder)")
    b.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    for f in fields(BuildConfig):
        b.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})
    report = build(args.out, cfg, tuple(s for s in args.stages.split(",") if s))
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "per_class"} if isinstance(v, dict) else v)
               for k, v in report.items() if k != "config"}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
