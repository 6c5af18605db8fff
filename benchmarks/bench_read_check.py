"""What checking a file's contents costs when a checkpoint is loaded (prints numbers; not a test).

Reads one original-layout SD 1.5 checkpoint with random weights (written once into --folder), alternating, and prints
the median of each way: safetensors' own ``load_file`` (lazy: it maps the file and reads nothing yet) and
``reading.read`` (every tensor read and checked finite); with ``--whole``, the whole ``load_single_file`` as it was
(load_file, no check) and as it is now (reading.read), which is the figure that matters: the conversion reads every
value anyway.

    python benchmarks/bench_read_check.py [--folder DIR] [--repeats 5] [--dtype fp16|fp32] [--whole]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_file(folder: Path, dtype: torch.dtype) -> Path:
    """SD 1.5's architecture (the pack's shipped config) with random weights, as a single file."""
    from comfyui_finetune.trainers.model.checkpoint import to_single_file

    path = folder / f"sd15-random-{str(dtype).split('.')[-1]}.safetensors"
    if path.is_file():
        return path
    from random_models import TOY_TOKENIZER, random_model
    from safetensors.torch import save_file

    model = random_model("sd15", TOY_TOKENIZER, dtype=dtype)
    save_file(to_single_file(model, dtype), str(path))
    return path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # random_models.py


def timed(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="", help="where the random checkpoint is kept between runs (default: a "
                                                 "temporary folder)")
    ap.add_argument("--repeats", type=whole(1), default=5)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--whole", action="store_true", help="also time the whole load_single_file")
    args = ap.parse_args()

    from safetensors.torch import load_file

    from comfyui_finetune.trainers.runs.reading import read

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = make_file(folder, torch.float16 if args.dtype == "fp16" else torch.float32)
        size = path.stat().st_size / 2 ** 30
        ways = {"load_file (no check)": lambda: load_file(str(path)),
                "reading.read (finite check)": lambda: read(path, "checkpoint")}
        if args.whole:
            from comfyui_finetune.trainers.model.loading import load_single_file

            from random_models import TOY_TOKENIZER

            from comfyui_finetune.trainers.runs import reading

            def unchecked():  # the whole load as it was: safetensors' load_file, no look at the values
                checked = reading.read
                reading.read = lambda p, what="", keys=None: (load_file(str(p)), {})
                try:
                    return load_single_file(path, TOY_TOKENIZER, "cpu", "auto")
                finally:
                    reading.read = checked

            ways["whole load, unchecked (before)"] = unchecked
            ways["whole load, checked (now)"] = lambda: load_single_file(path, TOY_TOKENIZER, "cpu", "auto")
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                times[name].append(timed(fn))
        print(f"{path.name}: {size:.2f} GiB, torch threads {torch.get_num_threads()}, {args.repeats} repeats")
        for name, ts in times.items():
            print(f"  {name:32s} median {statistics.median(ts):6.2f} s   (min {min(ts):.2f}, max {max(ts):.2f})")


if __name__ == "__main__":
    main()
