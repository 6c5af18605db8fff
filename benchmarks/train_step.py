"""The pack's LoRA training step against a bare floor written here: time per step, peak memory, model-FLOP use.

    python benchmarks/train_step.py                       # CPU: toy at 32 px, SD1.5 architecture at 256 px
    python benchmarks/train_step.py --device cuda         # GPU: SD1.5 at 512 px and SDXL at 1024 px, batch 1 and 4
    python benchmarks/train_step.py --case sd15:256:1 --rounds 5 --steps 6
    python benchmarks/train_step.py --case sdxl:128:1 --rounds 1 --steps 4   # SDXL's architecture on a CPU
    python benchmarks/train_step.py --growth toy          # step time against batch size and resolution

The **floor** is the least a LoRA step can do: a diffusers UNet with a peft LoRA (rank 4 on attention), latents and
text embeddings encoded once, then the VAE and text encoder freed, and per step noise, a forward, the loss, a
backward, gradient clipping and AdamW. The **pack** is ``FT_TrainLoRA`` on the same model, data, batch, precision
and LoRA placement (its log's per-step seconds; on a GPU offloaded, as FT_LoadBaseModel's default keeps it).
Each measurement runs in a fresh process (peak memory is per process), floor and pack alternating for ``--rounds``
rounds; the medians and the pack / floor ratios are printed.
SD1.5 and SDXL are their architectures with random weights (the configs shipped in ``configs/``), so nothing is
downloaded. SDXL's floor feeds its UNet random text embeddings (both encoders' outputs and the pooled one); the
pack encodes the captions with both encoders once, as it trains SDXL.

On a GPU the model's frozen weights are bf16 (fp16 where bf16 is missing), the LoRA fp32, under autocast; the
peak is ``torch.cuda.max_memory_allocated``, and the model-FLOP utilisation is the FLOPs of one step (counted by
``torch.utils.flop_counter`` on the floor) per second over the GPU's peak dense bf16 rate (``--peak-tflops`` to
set it; a few GPUs are known).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: peak dense bf16 tensor rates (TFLOP/s) by a part of the device name
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0,
         "3090": 71.0}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4


# ------------------------------------------------------------------------------------------------ models --
def sd15_model(dtype, device):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_finetune.trainers.model.model import FTModel
    from comfyui_finetune.trainers.toy.loader import load_toy_model

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15/unet/config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((CONFIGS / "sd15/vae/config.json").read_text()))
    te = CLIPTextModel(CLIPTextConfig.from_json_file(str(CONFIGS / "sd15/text_encoder/config.json")))
    tok = load_toy_model().tokenizer  # ids well inside CLIP's vocabulary: the text only has to be encoded
    sched = json.loads((CONFIGS / "sd15/scheduler/scheduler_config.json").read_text())
    model = FTModel("sd15", "sd15-random", unet.eval(), vae.eval(), te.eval(), tok, sched)
    return model.to(device, dtype)


def sdxl_model(dtype, device):
    """SDXL's architecture (configs/sdxl) with random weights: 2.6 B UNet weights, CLIP ViT-L and OpenCLIP bigG."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from comfyui_finetune.trainers.model.model import FTModel
    from comfyui_finetune.trainers.toy.loader import load_toy_model

    cfg = CONFIGS / "sdxl"
    torch.manual_seed(0)
    unet = sdxl_unet(dtype, "cpu")
    vae = AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text())).to(dtype)
    te = CLIPTextModel(CLIPTextConfig.from_json_file(str(cfg / "text_encoder/config.json"))).to(dtype)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(str(cfg / "text_encoder_2/config.json")))
    tok = load_toy_model().tokenizer  # ids well inside CLIP's vocabulary: the text only has to be encoded
    sched = json.loads((cfg / "scheduler/scheduler_config.json").read_text())
    model = FTModel("sdxl", "sdxl-random", unet, vae.eval(), te.eval(), tok, sched, text_encoder_2=te2.to(dtype).eval(),
                    tokenizer_2=load_toy_model().tokenizer)
    return model.to(device, dtype)


def zimage_model(dtype, device, layers: int | None = None):
    """Z-Image's architecture (configs/zimage) with random weights: the transformer (6.15 B weights; ``layers`` of its
    30 main layers: the same width and refiners, fewer blocks), Qwen3-4B (built in ``dtype``: 8 GB in bf16, not 16 in
    fp32) and the Flux VAE."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from comfyui_finetune.trainers.model.model import FTModel
    from comfyui_finetune.trainers.toy.loader import load_toy_zimage_model

    cfg = CONFIGS / "zimage"
    config = json.loads((cfg / "transformer/config.json").read_text())
    if layers:
        config["n_layers"] = layers
    torch.manual_seed(0)
    dit = ZImageTransformer2DModel.from_config(config).to(dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        te = Qwen3Model(Qwen3Config(**json.loads((cfg / "text_encoder/config.json").read_text())))
    finally:
        torch.set_default_dtype(default)
    vae = AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text()))
    tok = load_toy_zimage_model().tokenizer  # ids well inside Qwen's vocabulary: the text only has to be encoded
    sched = json.loads((cfg / "scheduler/scheduler_config.json").read_text())
    model = FTModel("zimage", "zimage-random", dit.eval(), vae.eval(), te.eval(), tok, sched)
    return model.to(device, dtype)


def toy_model(dtype, device):
    from comfyui_finetune.trainers.toy.loader import load_toy_model

    return load_toy_model().to(device, dtype)


def sdxl_unet(dtype, device):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = json.loads((CONFIGS / "sdxl/unet/config.json").read_text())
    return UNet2DConditionModel.from_config(config).eval().to(device, dtype)


# ------------------------------------------------------------------------------------------------ workers --
def pictures(n: int, size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def frozen_dtype(device: str, precision: str):
    import torch

    if device == "cpu" or precision == "fp32":
        return torch.float32
    if precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB


def worker_pack(args) -> dict:
    import torch

    from comfyui_finetune.nodes import host
    from comfyui_finetune.nodes.train import FT_TrainLoRA
    from comfyui_finetune.trainers.data.dataset import Dataset, Example

    dt = frozen_dtype(args.device, args.precision)
    model = {"toy": toy_model, "sd15": sd15_model, "sdxl": sdxl_model}[args.model](dt, args.device)
    if args.device == "cuda" and not args.no_offload:  # as FT_LoadBaseModel's offload auto keeps it
        model.to(model.device, offload=True)
        torch.cuda.empty_cache()
    n = max(2 * args.batch, 4)
    ds = Dataset([Example(p, "a photo of a sks thing", f"p{i}") for i, p in enumerate(pictures(n, args.size))],
                 resolution=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        host.set_folders(output=Path(tmp) / "output", models=Path(tmp) / "models", input=Path(tmp) / "input")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, _, log = FT_TrainLoRA().execute(
            model, ds, steps=args.steps, learning_rate=1e-4, batch_size=args.batch, rank=RANK, alpha=float(RANK),
            seed=0, target_modules="attention", train_text_encoder=False, text_encoder_lr=0.0, run_name="bench",
            mixed_precision="no" if args.device == "cpu" else ("fp16" if dt == torch.float16 else "bf16"),
            gradient_checkpointing=args.checkpointing)
        rows = [json.loads(x) for x in (Path(tmp) / "output" / "finetune" / log.run / "log.jsonl").read_text()
                .splitlines()]
    times = [r["seconds"] for r in rows][args.warmup:]
    return {"s_per_step": statistics.median(times), "peak_gb": peak_memory(args.device)}


def worker_floor(args) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    dev = torch.device(args.device)
    dt = frozen_dtype(args.device, args.precision)
    n = max(2 * args.batch, 4)
    px = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1 for p in pictures(n, args.size)])
    if args.model == "sdxl":
        unet = sdxl_unet(dt, dev)
        lat = torch.randn(n, 4, args.size // 8, args.size // 8, device=dev)  # no VAE: the step is the UNet's
        ctx = torch.randn(1, 77, 2048, device=dev, dtype=dt)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(args.batch, 1280, device=dev, dtype=dt),
                                       "time_ids": torch.tensor([[args.size] * 6] * args.batch, device=dev,
                                                                dtype=dt)}}
        sched_cfg = json.loads((CONFIGS / "sdxl/scheduler/scheduler_config.json").read_text())
    else:
        model = (toy_model if args.model == "toy" else sd15_model)(dt, args.device)
        with torch.no_grad():
            dist = model.vae.encode(px.to(dev, dt)).latent_dist
            lat = (dist.mean * model.vae.config.scaling_factor).float()
            ctx = model.encode_prompts(["a photo of a sks thing"])
        unet, sched_cfg, extra = model.unet, model.scheduler_config, {}
        model.vae = model.text_encoder = None  # the floor frees the frozen encoders
        del model
        gc.collect()
    unet.requires_grad_(False)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                       target_modules=TARGETS), unet, adapter_name="floor")
    params = [p for n_, p in unet.named_parameters() if "lora_" in n_]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda")
    noise_sched = DDPMScheduler.from_config(sched_cfg)
    autocast = (torch.autocast("cuda", dtype=dt) if args.device == "cuda" else torch.autocast("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cuda") if dt == torch.float16 else None
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(n, (args.batch,), generator=g)
        x0 = lat[idx.to(lat.device)]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=g).to(dev)
        noisy = noise_sched.add_noise(x0, noise, t)
        with autocast:
            pred = unet(noisy.to(dt), t, encoder_hidden_states=ctx.expand(args.batch, -1, -1), **extra).sample
            loss = F.mse_loss(pred.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"s_per_step": statistics.median(times[args.warmup:]), "peak_gb": peak_memory(args.device)}
    if args.device == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        out["flops"] = fc.get_total_flops()
    return out


# ------------------------------------------------------------------------------------------------ driver --
def measure(kind: str, case: tuple[str, int, int], args) -> dict:
    model, size, batch = case
    cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--size", str(size), "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--precision", args.precision] + (["--checkpointing"] if args.checkpointing else []) + \
        (["--no-offload"] if args.no_offload else [])
    env = {**os.environ, "FT_NO_PROGRESS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        tail = res.stderr.strip().splitlines()[-3:]
        if any("OutOfMemory" in line or "out of memory" in line for line in tail):
            return {"error": "out of memory"}
        raise RuntimeError(f"{kind} {case} failed:\n" + "\n".join(tail))
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_tflops(args) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


def compare(case, args) -> dict:
    kinds = ["floor", "pack"]
    got: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:  # interleaved: a machine that slows down slows both alike
            got[k].append(measure(k, case, args))
    out = {}
    for k, rows in got.items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            out[k] = {"error": rows[0]["error"]}
            continue
        out[k] = {"s_per_step": statistics.median(r["s_per_step"] for r in ok),
                  "peak_gb": statistics.median(r["peak_gb"] for r in ok),
                  "flops": next((r["flops"] for r in ok if "flops" in r), None)}
    return out


def fmt_case(case) -> str:
    return f"{case[0]} {case[1]} px, batch {case[2]}"


def report(case, res: dict, args) -> None:
    peak = peak_tflops(args) if args.device == "cuda" else None
    flops = res["floor"].get("flops")
    line = [f"{fmt_case(case):<26}"]
    for k in ("floor", "pack"):
        r = res.get(k)
        if r is None:
            line.append(f"{k}: (not trained by the pack yet)")
            continue
        if "error" in r:
            line.append(f"{k}: {r['error']}")
            continue
        mfu = f", MFU {100 * flops / r['s_per_step'] / (peak * 1e12):.0f} %" if flops and peak else ""
        line.append(f"{k} {r['s_per_step']:.3f} s/step ({1 / r['s_per_step']:.2f} steps/s), peak "
                    f"{r['peak_gb']:.2f} GB{mfu}")
    if "pack" in res and "error" not in res["pack"] and "error" not in res["floor"]:
        line.append(f"ratio: step {res['pack']['s_per_step'] / res['floor']['s_per_step']:.2f} x, memory "
                    f"{res['pack']['peak_gb'] / res['floor']['peak_gb']:.2f} x")
    print(" | ".join(line), flush=True)


def growth(model: str, args) -> None:
    sizes = {"toy": [32, 64], "sd15": [128, 256] if args.device == "cpu" else [512, 768],
             "sdxl": [512, 1024]}[model]
    kind = "pack"
    print(f"\n{kind} step time of {model} against batch and resolution ({args.device}):")
    base = None
    for size in sizes:
        for batch in (1, 2, 4):
            r = measure(kind, (model, size, batch), args)
            if "error" in r:
                print(f"  {size:>5} px, batch {batch}: {r['error']}")
                continue
            base = base or r["s_per_step"]
            print(f"  {size:>5} px, batch {batch}: {r['s_per_step']:.3f} s/step ({r['s_per_step'] / base:.1f} x the "
                  f"first), {r['s_per_step'] / batch:.3f} s per picture, peak {r['peak_gb']:.2f} GB", flush=True)


def parse_case(text: str) -> tuple[str, int, int]:
    model, size, batch = text.split(":")
    return model, int(size), int(batch)


def main() -> None:
    from comfyui_finetune.flags import positive, whole

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--case", action="append", type=parse_case, help="model:size:batch (toy, sd15, sdxl); repeatable")
    ap.add_argument("--rounds", type=whole(1), default=3)
    ap.add_argument("--steps", type=whole(1), default=6)
    ap.add_argument("--warmup", type=whole(0), default=2, help="first steps left out of each median")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="GPU only")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    ap.add_argument("--no-offload", action="store_true", help="GPU: the pack's model stays on the GPU "
                    "(FT_LoadBaseModel offload off); by default its weights wait in CPU memory and the VAE and text encoder leave the "
                    "GPU once their outputs are cached, as the node's default does")
    ap.add_argument("--growth", choices=["toy", "sd15", "sdxl"], help="also: step time against batch and size")
    ap.add_argument("--peak-tflops", type=positive, default=None, help="the GPU's peak (default: from its name)")
    ap.add_argument("--worker", choices=["floor", "pack"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=whole(1), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=whole(1), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} must be below --steps {args.steps}: each median needs a step after the "
                 "warm-up")
    if args.worker:
        import torch

        with torch.inference_mode(False):
            out = (worker_floor if args.worker == "floor" else worker_pack)(args)
        print(json.dumps(out))
        return
    cases = args.case or ([("toy", 32, 4), ("sd15", 256, 1)] if args.device == "cpu" else
                          [("sd15", 512, 1), ("sd15", 512, 4), ("sdxl", 1024, 1), ("sdxl", 1024, 4)])
    print(f"LoRA rank {RANK} on attention, {args.rounds} rounds x {args.steps} steps (median of steps "
          f"{args.warmup + 1}..), {args.device}, {'fp32' if args.device == 'cpu' else args.precision}"
          f"{', gradient checkpointing' if args.checkpointing else ''}")
    for case in cases:
        report(case, compare(case, args), args)
    if args.growth:
        growth(args.growth, args)


if __name__ == "__main__":
    main()
