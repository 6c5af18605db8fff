"""What the checkpoint digests cost: writing and reading back a big checkpoint (a full fine-tune's size) with the
pack's save_checkpoint / load_checkpoint (every file hashed with sha256 as it is written, the sizes and digests in
manifest.json, checked before a resume reads the files) against the same files written and read without them
(safetensors' save_file, torch.save to a path, no check).

    python benchmarks/bench_checkpoint_digest.py [--mb 1024] [--repeats 3] [--dir FOLDER]

Half of ``--mb`` is the trainable tensors (fp32), half the optimizer's two moments in state.pt. Both ways end with
the same fsyncs and rename (publish_folder). Reads follow the writes, so the files come from the page cache: the
"read" times are the CPU's cost (hashing, parsing), not the disk's. Prints the median of ``--repeats`` of each.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def checkpoint(mb: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    n = max(1, mb // 2 // 4)  # tensors of 1 M floats (4 MB) each: half the size trainable, half optimizer state
    trainable = {f"unet.block.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(n)}
    moments = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(512, 1024, generator=g),
                   "exp_avg_sq": torch.rand(512, 1024, generator=g)} for i in range(n)}
    state = {"optimizer": {"state": moments, "param_groups": [{"lr": 1e-5, "params": list(range(n))}]},
             "lr_scheduler": {"last_epoch": 10}, "scaler": None, "rng": torch.Generator().get_state(),
             "data": {"epoch": 0, "position": 3}, "ema": None}
    return trainable, state


def save_plain(run, step: int, trainable: dict, state: dict, rows: list) -> Path:
    """The checkpoint as the pack wrote it before digests."""
    from safetensors.torch import save_file

    from comfyui_finetune.trainers.runs.atomic import publish_folder

    folder = run.path / "checkpoints" / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True)
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "log.json").write_text(json.dumps(rows))
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "method": "full",
                                                   "files": ["trainable.safetensors", "state.pt", "log.json"]}))
    return publish_folder(tmp, folder, "checkpoint")


def read_plain(folder: Path):
    from safetensors.torch import load_file

    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    return load_file(str(folder / "trainable.safetensors")), state


def timed(fn) -> float:
    t = time.perf_counter()
    out = fn()
    if isinstance(out, tuple):  # read every tensor whole, as a resume copies them into the model: safetensors maps
        sum(float(t.sum()) for t in out[0].values())  # the file, and its pages are read on first use
    return time.perf_counter() - t


def main() -> None:
    from comfyui_finetune.trainers.runs.integrity import problems
    from comfyui_finetune.trainers.runs.run_dir import RunDir, load_checkpoint, save_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="checkpoint size in MB (default 1024)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    trainable, state = checkpoint(args.mb)
    rows = [{"step": i, "loss": 0.1} for i in range(10)]
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for r in range(args.repeats):
            for way in ("plain", "digest"):
                run = RunDir(Path(d) / f"{way}-{r}")
                save = save_plain if way == "plain" else (lambda *a: save_checkpoint(a[0], a[1], "full", *a[2:]))
                times.setdefault(f"write {way}", []).append(timed(lambda: save(run, 1, trainable, state, rows)))
                folder = run.path / "checkpoints" / "step-1"
                read = read_plain if way == "plain" else load_checkpoint
                times.setdefault(f"read {way}", []).append(timed(lambda: read(folder)))
                if way == "digest":
                    times.setdefault("verify only", []).append(timed(lambda: problems(folder)))
                size = sum(p.stat().st_size for p in folder.iterdir())
                shutil.rmtree(run.path)
    print(f"checkpoint: {size / 2**20:,.0f} MiB on disk, {args.repeats} repeats (median seconds)")
    for key, values in times.items():
        print(f"  {key:14s} {statistics.median(values):6.2f} s   ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
