"""Command line: ``python -m comfyui_finetune COMMAND ...``.

``run WORKFLOW_API.json --out DIR [--input DIR] [--models DIR]`` runs an API-format workflow of this pack's nodes
without a ComfyUI server (see :mod:`comfyui_finetune.runner`); ``demo --out DIR`` runs the toy world end to end;
``train RUN/config.json`` repeats (or ``--resume``s) a training from its run folder, also under ``torchrun``
(see :mod:`comfyui_finetune.train_cli`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .runner import add_run_args, main_run
from .train_cli import add_train_args, main_train


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    from .flags import named

    parser.add_argument("--out", type=named, default="demo_output",
                        help="folder for the demo's pictures (default: demo_output)")


def main_demo(args: argparse.Namespace) -> int:
    """Run the toy world end to end and write pictures a newcomer can open."""
    import json

    from .demo import run_demo

    summary = run_demo(args.out)
    print(json.dumps(summary, indent=1))
    print(f"open {summary['overview']} to see what the toy model draws, {summary['lora_figure']} for what a "
          f"LoRA taught it, and {summary['controlnet_figure']} for a ControlNet placing shapes")
    return 0

#: Subcommands: name -> (add its arguments to a parser, run it with the parsed args and return the exit code).
#: ---- add new subcommands here (e.g. "demo", "train") ----
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "run": (add_run_args, main_run),
    "demo": (add_demo_args, main_demo),
    "train": (add_train_args, main_train),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_finetune",
                                     description="comfyui-finetune without the ComfyUI server.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, main) in SUBCOMMANDS.items():
        summary = (main.__doc__ or "").strip().splitlines()[0] if main.__doc__ else None
        p = sub.add_parser(name, parents=[common], help=summary, description=summary)
        add_args(p)
        p.set_defaults(_main=main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
