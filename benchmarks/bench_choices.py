"""Each adapter kind and each optimizer on the toy: how much of the concept it learns in the same steps, its file
size, and its step time against LoRA + AdamW.

    python benchmarks/bench_choices.py [--steps 200] [--only kinds|optimizers]

Every run trains "a sks star" = purple stars (8 pictures, batch 4, rank 8, attention + feed-forward, seed 0) with
the training node, then the toy judge scores 16 pictures of "a sks star" (concept rate) and 8 of "a red circle"
(kept rate). The step time is the median of the log's per-step seconds (first 5 left out). Each kind or optimizer
gets the learning rate it is used with (LR below): the comparison is at the same steps, not the same LR.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

#: (adapter, optimizer) -> learning rate
LR = {("lora", "adamw"): 1e-3, ("loha", "adamw"): 3e-3, ("lokr", "adamw"): 1e-3, ("dora", "adamw"): 1e-3,
      ("lora", "adam"): 1e-3, ("lora", "sgd"): 1e-1, ("lora", "rmsprop"): 1e-3, ("lora", "prodigy"): 1.0,
      ("lora", "adafactor"): 1e-3, ("lora", "adamw8bit"): 1e-3, ("lora", "schedulefree_adamw"): 3e-3,
      ("lora", "lion"): 3e-4}


def main() -> None:
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=whole(1), default=200)
    ap.add_argument("--only", choices=["kinds", "optimizers"])
    ap.add_argument("--runs", default="", help="only these, e.g. lora:lion,loha:adamw (lora:adamw is the reference)")
    args = ap.parse_args()
    os.environ.setdefault("FT_NO_PROGRESS", "1")

    import numpy as np
    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.datasets import FT_ToyDataset
    from comfyui_finetune.nodes.train import FT_TrainLoRA
    from comfyui_finetune.trainers.sampling import sample
    from comfyui_finetune.trainers.toy.loader import load_toy_judge, load_toy_model

    toy, judge = load_toy_model(), load_toy_judge()
    ds = FT_ToyDataset().execute("purple", "star", 8, "a sks star", 0, "narrow")[0]
    runs = [k for k in LR if args.only is None or (args.only == "kinds") == (k[1] == "adamw")]
    if args.runs:
        wanted = {tuple(r.split(":")) for r in args.runs.split(",")} | {("lora", "adamw")}
        runs = [k for k in runs if k in wanted]

    def rate(model, prompt, color, shape, seeds):
        res = judge.judge(sample(model, prompt, seeds=seeds, steps=20, cfg=4.0))
        return float(np.mean([r["color"] == color and r["shape"] == shape for r in res]))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        host.set_folders(output=Path(tmp) / "out", models=Path(tmp) / "models", input=Path(tmp) / "in")
        for kind, opt in runs:
            try:
                with torch.inference_mode(False):
                    tuned, lora, log = FT_TrainLoRA().execute(
                        toy, ds, steps=args.steps, learning_rate=LR[(kind, opt)], batch_size=4, rank=8, alpha=8.0,
                        seed=0, target_modules="attention+feedforward", train_text_encoder=False,
                        text_encoder_lr=0.0, run_name=f"{kind}-{opt}", snr_gamma=5.0, adapter=kind, optimizer=opt)
                    concept = rate(tuned, "a sks star", "purple", "star", list(range(1000, 1016)))
                    kept = rate(tuned, "a red circle", "red", "circle", list(range(1000, 1008)))
            except ModuleNotFoundError as e:
                print(f"{kind:>5} {opt:<19} skipped: {e}")
                continue
            step = statistics.median(r["seconds"] for r in log.rows[5:])
            size = sum(v.numel() * v.element_size() for v in lora.state.values())
            rows.append((kind, opt, LR[(kind, opt)], concept, kept, size, step))
            print(f"{kind:>5} {opt:<19} lr {LR[(kind, opt)]:<6g} concept {concept:.2f} kept {kept:.2f} "
                  f"file {size / 1024:7.0f} KiB  step {step * 1000:6.1f} ms", flush=True)
    ref = next((r for r in rows if r[:2] == ("lora", "adamw")), None)
    print(f"\n| adapter | optimizer | lr | concept ({args.steps} steps) | other prompt kept | file "
          "| step vs LoRA+AdamW |")
    print("|---|---|---|---|---|---|---|")
    for kind, opt, lr, concept, kept, size, step in rows:
        rel = f"{step / ref[6]:.2f} x" if ref else "-"
        print(f"| {kind} | {opt} | {lr:g} | {concept:.2f} | {kept:.2f} | {size / 1024:.0f} KiB | {rel} |")


if __name__ == "__main__":
    main()
