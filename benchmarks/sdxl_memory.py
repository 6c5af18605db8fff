"""What an SDXL LoRA run with FT_TrainLoRA's (or FT_TrainDreamBooth's) defaults would hold on a GPU, counted on the CPU.

    python benchmarks/sdxl_memory.py                        # 1024 px, batch 1, 2 steps (9.5 minutes here)
    python benchmarks/sdxl_memory.py --size 256 --steps 1   # a quick look
    python benchmarks/sdxl_memory.py --checkpointing off    # what gradient checkpointing saves
    python benchmarks/sdxl_memory.py --steps 0 --sample 8   # FT_Sample alone (DreamBooth's class pictures: 8 a call)
    python benchmarks/sdxl_memory.py --method dreambooth --sample 0   # FT_TrainDreamBooth (14 minutes here)

Counted here (2-core CPU) at 1024 px, when the UNet still joined the text encoders before they left: training
4.54 GB caching the latents, 6.86 GB setting up, 5.67 GB per step; FT_Sample of 1: 5.09 GB denoising, 4.06 GB
decoding; of 8: 7.25 GB and 4.16 GB. Without gradient checkpointing (``--checkpointing off --pictures 1``) the
training steps hold 11.01 GB. FT_TrainDreamBooth's defaults (a LoRA on attention+feedforward, prior preservation:
each step one instance and one class picture) with 8 class pictures: 4.63 GB caching the latents (the class
pictures' too), 6.90 GB setting up, 6.49 GB per step.

Issue 19's target is a LoRA at 1024 px, batch 1, in 10 GB of GPU memory. ``benchmarks/train_step.py --device cuda``
measures it on a GPU (``torch.cuda.max_memory_allocated``). Without one, this counts the same bytes on the CPU: the
training runs on SDXL's architecture with random weights (``configs/sdxl``), laid out as FT_LoadBaseModel's dtype
auto lays it out on a GPU (fp16 weights, the VAE in fp32 since SDXL's overflows in fp16; here bf16, the same
bytes, as the CPU has no fp16 kernels), under bf16 autocast, with gradient checkpointing on (auto's choice for SDXL
on a GPU) and every other input at FT_TrainLoRA's default. torch's profiler records every tensor allocation and
free in the run, so the live bytes at each moment are known; what would be on the GPU is added from the run's own
sequence (``trainers/loop/run.py`` and ``trainers/loop/precision.py``: with ``offload`` auto the VAE and the text
encoders visit the GPU first and leave once the latents and the captions' embeddings are cached; the UNet comes after
them, so that it never meets them on the GPU):

- **caching the latents and captions** (the dataset's, then DreamBooth's class pictures'): the VAE's and the text
  encoders' weights, plus the most the run held at once until they left;
- **adapters, optimizer, training steps**: the UNet's weights, plus the most held after it came (LoRA weights, their
  gradients and AdamW's state, the cached latents and embeddings, the activations);
- **FT_Sample** at the same size (``--sample N`` pictures, one denoising step): the text encoders, the UNet, then
  the VAE, each stage with its own part's weights (``trainers/sampling.py``).

Everything the run allocated is counted as if it were on the GPU (its pictures and CPU-side copies too), so the
figures err high. A GPU adds what no allocation shows: the CUDA context (about 0.5 GB, outside
``max_memory_allocated``), cuDNN / cuBLAS workspaces, and the caching allocator's slack (``max_memory_reserved``
above the allocated figure). The CPU's attention (SDPA's flash kernel) does not hold the attention matrix either,
as the GPU's does not.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (the SDXL architecture with random weights, the benchmark pictures)

GB = 2**30


def part_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def live_peaks(prof, splits: list[int]) -> list[int]:
    """The most bytes live at once (counted from the profile's start) in each window between ``splits``."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    peaks = [0] * (len(splits) + 1)
    live = 0
    for t, n in events:
        live += n
        w = sum(t >= s for s in splits)
        peaks[w] = max(peaks[w], live)
    return peaks


def mark(prof, name: str) -> int:
    found = [e.end_ns() for e in prof.profiler.kineto_results.events() if e.name() == name]
    if len(found) != 1:
        raise RuntimeError(f"expected one {name!r} in the run, found {len(found)}")
    return found[0]


def marked(fn, name: str, before: bool = False):
    """``fn``, with a mark in the profile after it (or ``before`` it): where the run's parts move."""
    from torch.profiler import record_function

    def wrapper(*a, **kw):
        if before:
            with record_function(name):
                pass
        out = fn(*a, **kw)
        if not before:
            with record_function(name):
                pass
        return out
    return wrapper


def measure_training(model, args) -> tuple[list[int], object, str]:
    """FT_TrainLoRA (or FT_TrainDreamBooth) with its defaults under torch's profiler: the most bytes held while the
    VAE and text encoders cache their outputs, and once the denoiser is placed (adapters, optimizer, steps); the
    run's log; what ran, in words."""
    from torch.profiler import ProfilerActivity, profile

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.train import FT_TrainDreamBooth, FT_TrainLoRA
    from comfyui_finetune.trainers.config.recipes import DreamBoothRecipe, LoRARecipe
    from comfyui_finetune.trainers.data.dataset import Dataset, Example
    from comfyui_finetune.trainers.loop import run as loop

    def dataset(n: int, caption: str, seed: int) -> Dataset:
        return Dataset([Example(p, caption, f"p{i}") for i, p in
                        enumerate(train_step.pictures(n, args.size, seed))], resolution=args.size)

    n = max(args.batch, args.pictures)
    ds = dataset(n, "a photo of a sks thing", 0)
    node, recipe = (FT_TrainDreamBooth, DreamBoothRecipe) if args.method == "dreambooth" else (FT_TrainLoRA, LoRARecipe)
    defaults = recipe()
    inputs = {f.name: getattr(defaults, f.name) for f in fields(recipe) if f.name in recipe.options()}
    inputs.update(steps=args.steps, batch_size=args.batch, gradient_checkpointing=args.checkpointing,
                  run_name="memory", **({"rank": args.rank} if args.rank else {}))
    more = ""
    if args.method == "dreambooth":  # prior preservation on class pictures given (none to generate)
        inputs.update(instance_prompt="a photo of a sks thing", class_prompt="a photo of a thing",
                      num_class_images=args.class_pictures)
        inputs["class_dataset"] = dataset(args.class_pictures, "a photo of a thing", 1)
        more = f", mode {defaults.mode}, prior preservation on {args.class_pictures} class pictures"
    real = loop.place_unet, loop.release_frozen
    loop.place_unet = marked(loop.place_unet, "ft: denoiser placed")
    loop.release_frozen = marked(loop.release_frozen, "ft: encoders left")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            host.set_folders(output=Path(tmp) / "output", models=Path(tmp) / "models", input=Path(tmp) / "input")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                log = node().execute(model, ds, **inputs)[2]
    finally:
        loop.place_unet, loop.release_frozen = real
    encoding, _, training = live_peaks(prof, [mark(prof, "ft: encoders left"), mark(prof, "ft: denoiser placed")])
    what = (f"{node.__name__} with its defaults (rank {inputs.get('rank', defaults.rank)}, "
            f"{log.config['recipe']['target_modules']}, text "
            f"encoders {'trained' if defaults.train_text_encoder else 'frozen'}{more}), batch {args.batch}, {n} "
            f"pictures, {args.steps} steps, gradient checkpointing {args.checkpointing}")
    return [encoding, training], log, what


def count_training(model, parts: dict, args) -> None:
    (encoding, training), log, what = measure_training(model, args)
    denoiser = parts[model.family.denoiser_part]
    print(what + ":")
    rows = [("caching the latents and captions (VAE and text encoders)", sum(parts.values()) - denoiser, encoding),
            ("adapters, optimizer, training steps (the denoiser)", denoiser, training)]
    for what, weights, held in rows:
        print(f"  {what}: {weights / GB:.2f} GB weights + {held / GB:.2f} GB held at most = "
              f"{(weights + held) / GB:.2f} GB")
    print(f"  the most at any time: {max(w + h for _, w, h in rows) / GB:.2f} GB; step seconds here: "
          + ", ".join(f"{r['seconds']:.0f}" for r in log.rows if "seconds" in r))


def measure_sampling(model, args) -> list[int]:
    """FT_Sample of ``args.sample`` pictures (one denoising step) under the profiler: the most bytes held while the
    text encoders, the denoiser and the VAE work (trainers/sampling.py: each visits the GPU in turn)."""
    from torch.profiler import ProfilerActivity, profile

    from comfyui_finetune.trainers import sampling

    real = sampling.denoise, sampling.decode
    sampling.denoise = marked(sampling.denoise, "ft: denoise", before=True)
    sampling.decode = marked(sampling.decode, "ft: decode", before=True)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sampling.sample(model, "a photo of a sks thing", seeds=list(range(args.sample)), steps=1,
                            width=args.size, height=args.size)
    finally:
        sampling.denoise, sampling.decode = real
    return live_peaks(prof, [mark(prof, "ft: denoise"), mark(prof, "ft: decode")])


def sampling_stages(model, parts: dict) -> list[tuple[str, int]]:
    return [("the prompts (text encoders)", sum(parts[p] for p in model.family.text_parts)),
            ("denoising (the denoiser)", parts[model.family.denoiser_part]), ("decoding (the VAE)", parts["vae"])]


def count_sampling(model, parts: dict, args) -> None:
    held = measure_sampling(model, args)
    print(f"FT_Sample of {args.sample} (one denoising step, classifier-free guidance):")
    for (what, weights), most in zip(sampling_stages(model, parts), held):
        print(f"  {what}: {weights / GB:.2f} GB weights + {most / GB:.2f} GB held at most = "
              f"{(weights + most) / GB:.2f} GB")


def parser(doc: str, checkpointing_for: str):
    """The options both memory benchmarks take."""
    from comfyui_finetune.flags import whole

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--size", type=whole(1), default=1024)
    ap.add_argument("--batch", type=whole(1), default=1)
    ap.add_argument("--steps", type=whole(0), default=2, help="the first step also makes AdamW's state; 0: no training")
    ap.add_argument("--pictures", type=whole(1), default=16, help="the dataset's size (its latents are encoded first)")
    ap.add_argument("--checkpointing", default="on", choices=["on", "off"],
                    help=f"on: what gradient_checkpointing auto chooses for {checkpointing_for} on a GPU")
    ap.add_argument("--method", default="lora", choices=["lora", "dreambooth"],
                    help="dreambooth: FT_TrainDreamBooth's defaults (LoRA, prior preservation: each step adds a class "
                    "picture per instance picture)")
    ap.add_argument("--class-pictures", type=whole(1), default=8, help="dreambooth: the class pictures given")
    ap.add_argument("--rank", type=whole(0), default=0, help="the LoRA's rank; 0: the node's default")
    ap.add_argument("--sample", type=whole(0), default=1, metavar="N",
                    help="also count FT_Sample of N pictures at the same size (one denoising step, then the decode); "
                    "0: no sampling")
    return ap


def main() -> None:
    args = parser(__doc__, "SDXL").parse_args()

    import torch

    torch.inference_mode(False).__enter__()
    model = train_step.sdxl_model(torch.bfloat16, "cpu")
    model.vae.float()  # as an fp16 SDXL keeps it (FTModel.part_dtype: the family's vae_upcast)
    parts = {name: part_bytes(m) for name, m in model.parts().items()}
    print(f"SDXL's architecture at {args.size} px, weights in 2 bytes, the VAE in fp32, bf16 autocast; counted on "
          "the CPU")
    print("  weights: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in parts.items()))
    if args.steps > 0:  # 0 is a value: no training
        count_training(model, parts, args)
    if args.sample > 0:
        count_sampling(model, parts, args)


if __name__ == "__main__":
    main()
