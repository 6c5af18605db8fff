"""What a Z-Image LoRA run with FT_TrainLoRA's defaults would hold on a GPU at 1024 px, counted on the CPU.

    python benchmarks/zimage_memory.py --rank 16 --pictures 1 --steps 1    # 1024 px, batch 1, rank 16
    python benchmarks/zimage_memory.py --size 256 --pictures 1 --steps 1   # a quick look (3 minutes here)

Issue 34's target: the defaults fit a rank-16 LoRA at 1024 px, batch 1, in 16 GB (bf16 frozen weights, gradient
checkpointing, the captions' embeddings cached and Qwen3-4B gone before the transformer trains). A GPU measures it
(``tests/test_cuda.py -k zimage``, in ``benchmarks/gpu_check.sh``); this counts the same bytes on the CPU, as
``sdxl_memory.py`` does for SDXL (read its text for how), with one difference: Z-Image's 6.15 B transformer (12.3 GB
in bf16) and Qwen3-4B (8 GB) do not fit this 23 GB machine beside the run. So the run goes twice, on the real
architecture with random weights (``configs/zimage``: full width, the refiners, Qwen3-4B and the Flux VAE whole) with
1 and with 2 of the transformer's 30 main layers, and what a layer adds is carried to 30 (each main layer is the
same block, with the same LoRA, the same checkpointed input and the same activations); the weights are the whole
model's. Both the measured figures and the carried ones are printed.

Counted here (2-core CPU), ``--rank 16 --pictures 1 --steps 1 --sample 1`` at 1024 px, in 10 minutes (GB = GiB):
caching the latents and captions 7.80 GB of VAE and Qwen3-4B weights + 1.27 GB held = 9.07 GB; the training step
11.46 GB of transformer weights + 2.29 GB held (1.38 at 1 layer, 1.41 at 2) = 13.75 GB, the most at any time; FT_Sample
of 1: the prompts 7.50 GB, denoising 12.41 GB, decoding 2.82 GB. Under the 16 GB target by 2.25 GB before what a GPU
adds (the CUDA context, about 0.5 GB; workspaces; the allocator's slack).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdxl_memory as counting  # noqa: E402  (the profiler's counting, shared)
import train_step  # noqa: E402  (Z-Image's architecture with random weights)

GB = counting.GB
LAYERS = 30  # Z-Image's main layers (configs/zimage/transformer/config.json n_layers)


def whole_weights() -> dict[str, int]:
    """The bytes of each part of the whole Z-Image in bf16 (the VAE in fp32, as the family keeps it), counted on
    the meta device (nothing allocated)."""
    import json

    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    cfg = train_step.CONFIGS / "zimage"
    with torch.device("meta"):
        dit = ZImageTransformer2DModel.from_config(json.loads((cfg / "transformer/config.json").read_text()))
        te = Qwen3Model(Qwen3Config(**json.loads((cfg / "text_encoder/config.json").read_text())))
        vae = AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text()))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"transformer": 2 * count(dit), "vae": 4 * count(vae), "text_encoder": 2 * count(te)}


def measured(layers: int, args) -> dict:
    import torch

    model = train_step.zimage_model(torch.bfloat16, "cpu", layers=layers)
    out = {"train": [0, 0], "sample": [0, 0, 0], "seconds": []}
    if args.steps > 0:
        out["train"], log, out["what"] = counting.measure_training(model, args)
        out["seconds"] = [r["seconds"] for r in log.rows if "seconds" in r]
    if args.sample > 0:
        out["sample"] = counting.measure_sampling(model, args)
    del model
    return out


def carried(one: list[int], two: list[int], layered: int) -> list[int]:
    """The bytes at 30 main layers from those at 1 and 2: in the stage the transformer works (index ``layered``),
    what one more layer adds, 29 times more; the other stages do not depend on its depth (the larger of the two)."""
    return [a + (LAYERS - 1) * (b - a) if i == layered else max(a, b) for i, (a, b) in enumerate(zip(one, two))]


def main() -> None:
    args = counting.parser(__doc__, "Z-Image").parse_args()
    if args.method != "lora":
        raise SystemExit("--method: this benchmark counts Train LoRA (DreamBooth's lora mode adds its class pictures)")
    import torch

    torch.inference_mode(False).__enter__()
    weights = whole_weights()
    print(f"Z-Image's architecture at {args.size} px, weights in bf16 (the VAE in fp32), bf16 autocast; counted on "
          "the CPU with 1 and 2 main layers, carried to 30")
    print("  weights of the whole model: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in weights.items()))
    runs = {n: measured(n, args) for n in (1, 2)}
    if args.steps > 0:
        print(runs[1]["what"] + ":")
        train = carried(runs[1]["train"], runs[2]["train"], 1)
        rows = [("caching the latents and captions (VAE and Qwen3-4B)", weights["vae"] + weights["text_encoder"],
                 0),
                ("adapters, optimizer, training steps (the transformer)", weights["transformer"], 1)]
        for what, w, i in rows:
            one, two = runs[1]["train"][i] / GB, runs[2]["train"][i] / GB
            print(f"  {what}: {w / GB:.2f} GB weights + {train[i] / GB:.2f} GB held at most (1 layer {one:.2f}, "
                  f"2 layers {two:.2f}) = {(w + train[i]) / GB:.2f} GB")
        print(f"  the most at any time: {max(w + train[i] for _, w, i in rows) / GB:.2f} GB; step seconds here "
              f"(1 and 2 layers): {runs[1]['seconds']}, {runs[2]['seconds']}")
    if args.sample > 0:
        held = carried(runs[1]["sample"], runs[2]["sample"], 1)
        print(f"FT_Sample of {args.sample} (one denoising step, classifier-free guidance):")
        stages = [("the prompts (Qwen3-4B)", weights["text_encoder"]), ("denoising (the transformer)",
                                                                        weights["transformer"]),
                  ("decoding (the VAE)", weights["vae"])]
        for (what, w), most in zip(stages, held):
            print(f"  {what}: {w / GB:.2f} GB weights + {most / GB:.2f} GB held at most = {(w + most) / GB:.2f} GB")


if __name__ == "__main__":
    main()
