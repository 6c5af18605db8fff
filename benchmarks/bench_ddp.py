"""Step time of one training under torchrun: 1 process against N processes (DistributedDataParallel, gloo on the
CPU or NCCL on GPUs), at the same global batch and at the same per-process batch.

    python benchmarks/bench_ddp.py [--procs 2] [--batch 4] [--steps 30] [--device cpu]

It makes a toy LoRA run with the training node, then repeats it from its config.json with
``python -m comfyui_finetune train`` under ``torch.distributed.run``, and reads each step's seconds from the run's
log.jsonl (median, first 3 steps left out). On a CPU each process gets cores / N threads, so the CPU figure measures
DDP's overhead, not a speed-up; on N GPUs the same command shows the scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_run(root: Path) -> Path:
    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA
    from comfyui_finetune.trainers.toy.loader import load_toy_model

    host.set_folders(output=root / "output", models=root / "models", input=root / "input")
    ds = FT_ToyDataset().execute("purple", "star", 16, "a sks star", 0, "narrow")[0]
    _, _, log = FT_TrainLoRA().execute(load_toy_model(), ds, steps=1, learning_rate=1e-3, batch_size=1, rank=8,
                                       alpha=8.0, seed=0, target_modules="attention+feedforward",
                                       train_text_encoder=False, text_encoder_lr=0.0, run_name="bench")
    return root / "output" / "finetune" / log.run


def config_with(run: Path, dest: Path, batch: int, steps: int) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors", "log.jsonl"))
    cfg = json.loads((dest / "config.json").read_text())
    cfg["recipe"].update(batch_size=batch, steps=steps)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest / "config.json"


def timed(procs: int, config: Path, out: Path, name: str, device: str) -> tuple[float, float]:
    threads = max(1, (os.cpu_count() or 2) // procs) if device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FT_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
           "comfyui_finetune", "train", str(config), "--out", str(out), "--run-name", name, "--device", device]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (out / "finetune" / name / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in rows[3:]), wall


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=whole(1), default=2)
    ap.add_argument("--batch", type=whole(1), default=4, help="the global batch")
    ap.add_argument("--steps", type=whole(1), default=30)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    n, b = args.procs, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root)
        cases = [("1 process, batch %d" % b, 1, b), (f"{n} processes, batch {b // n} each (global {b})", n, b // n),
                 (f"{n} processes, batch {b} each (global {b * n})", n, b)]
        results = []
        for label, procs, per in cases:
            cfg = config_with(run, root / f"cfg-{procs}-{per}", per, args.steps)
            step, wall = timed(procs, cfg, root / "out", f"p{procs}b{per}", args.device)
            results.append((label, step, wall, per * procs))
            print(f"{label:40s} {1000 * step:8.1f} ms/step  {per * procs / step:7.1f} pictures/s  (wall {wall:.1f} s)")
        base = results[0][1]
        print(f"step-time ratio, {n} processes / 1 process at the same global batch: {results[1][1] / base:.2f}")
        print(f"throughput ratio, {n} processes at batch {b} each / 1 process at batch {b}: "
              f"{(results[2][3] / results[2][1]) / (results[0][3] / base):.2f}")


if __name__ == "__main__":
    main()
