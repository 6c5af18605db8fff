"""The GPU side of the loop: autocast and its grad scaler, the UNet's memory order and compilation, and what to
say when memory runs out. Every choice is a recipe option (mixed_precision, channels_last, torch_compile,
gradient_checkpointing); on the CPU only a bf16 model changes anything (it trains under bf16 autocast)."""
from __future__ import annotations

import contextlib
import logging

import torch

from ..data.dataset import Dataset
from ..model.model import FTModel
from ..config.recipes import TrainConfig

log = logging.getLogger(__name__)


def autocast_for(model: FTModel, cfg: TrainConfig):
    """The autocast of the run and its grad scaler (fp16 only). Half-precision frozen weights with fp32 trainable
    ones need autocast to meet in one dtype: on a GPU it is ``mixed_precision``'s, on the CPU bf16 for a bf16 model."""
    if model.device.type == "cpu":
        if model.dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16), None
        return contextlib.nullcontext(), None
    if cfg.mixed_precision == "no" and model.dtype != torch.float32:
        raise ValueError(f"mixed_precision 'no' trains in fp32, but this model's weights are "
                         f"{str(model.dtype).removeprefix('torch.')}: choose auto, bf16 or fp16, or load the model "
                         "with dtype fp32")
    if model.device.type != "cuda" or cfg.mixed_precision == "no":
        return contextlib.nullcontext(), None
    dt = autocast_dtype(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if dt == torch.float16 else None
    return torch.autocast("cuda", dtype=dt), scaler


def autocast_dtype(model: FTModel, cfg: TrainConfig) -> torch.dtype:
    """``mixed_precision`` on a GPU. auto: a half-precision model's own dtype, so its frozen weights are not cast
    op by op into another one (fp16 weights under bf16 autocast lose three bits of each weight and are cast at every
    op; ComfyUI samples them in fp16); an fp32 model trains in bf16 where the GPU has it in hardware (Ampere on,
    not emulated), else in fp16 with a grad scaler."""
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    if dt is not None:
        return dt
    if model.dtype in (torch.float16, torch.bfloat16):
        return model.dtype
    in_hardware = bool(torch.version.hip) or torch.cuda.get_device_capability(model.device)[0] >= 8
    return torch.bfloat16 if in_hardware else torch.float16


def gpu_options(model: FTModel, cfg: TrainConfig) -> None:
    """channels_last and torch_compile on the UNet being trained (a share: the input model keeps its own)."""
    if model.device.type != "cuda":
        return
    if cfg.channels_last:
        model.denoiser.to(memory_format=torch.channels_last)
    if cfg.torch_compile:
        model.denoiser.compile()


def checkpointing(model: FTModel, cfg: TrainConfig) -> bool:
    """Whether this run checkpoints activations: gradient_checkpointing on / off, or auto (on where the model's
    family needs it on a GPU, ``Family.checkpointing_on_gpu``: SDXL; off on the CPU, where memory is rarely short
    and the recomputation costs a third more time)."""
    if cfg.gradient_checkpointing == "auto":
        return model.device.type == "cuda" and model.family.checkpointing_on_gpu
    return cfg.gradient_checkpointing == "on"


def enable_checkpointing(model: FTModel, method, cfg: TrainConfig) -> None:
    """Gradient checkpointing, where :func:`checkpointing` says so, on every module of ``method`` that trains."""
    if not checkpointing(model, cfg):
        return
    if cfg.gradient_checkpointing == "auto":
        log.info("gradient checkpointing on (gradient_checkpointing auto: %s on %s; set it to off for speed where "
                 "memory allows)", model.family.label, model.device)
    model.denoiser.enable_gradient_checkpointing()
    if method.trains_text_encoder:
        for te in model.text_encoders:
            # non-reentrant: the frozen embeddings give the first segment no input that needs a gradient, and the
            # reentrant form (transformers 4.x's default) then passes the encoder's LoRA none
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in method.train_modules(model):
        if m is not model.denoiser and m not in model.text_encoders and hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()


def memory_advice(model: FTModel, cfg: TrainConfig, dataset: Dataset, step: int, run: str,
                  checkpointed: bool) -> str:
    """What to lower when a step runs out of memory, from this run's own settings."""
    res = dataset.resolution or model.native_size
    ckpt = checkpointing(model, cfg)
    now = (f"batch_size {cfg.batch_size}, resolution {res}, frozen weights "
           f"{str(model.dtype).removeprefix('torch.')}, gradient_checkpointing {'on' if ckpt else 'off'}"
           f"{' (auto)' if cfg.gradient_checkpointing == 'auto' else ''}")
    fixes = []
    if not ckpt:
        fixes.append("set gradient_checkpointing to on")
    if cfg.batch_size > 1:
        eff = cfg.batch_size * cfg.grad_accum
        fixes.append(f"lower batch_size (batch_size 1 with grad_accum {eff} keeps the effective batch of {eff})")
    if model.dtype == torch.float32 and model.device.type == "cuda":
        fixes.append("load the base model with dtype fp16 or bf16")
    if model.device.type == "cuda" and cfg.mixed_precision == "no":
        fixes.append("set mixed_precision to auto")
    fixes.append(f"lower the dataset's resolution (now {res})")
    kept = (f" The checkpoint of step {step} is kept: resume_run '{run}' continues it." if checkpointed else "")
    return (f"out of {'GPU ' if model.device.type == 'cuda' else ''}memory at step {step + 1} ({now}). To fit: "
            + "; ".join(fixes) + ". Other programs using the GPU also take its memory." + kept)


# ------------------------------------------------------------------------------------ offloaded models --
def place_for_training(model: FTModel) -> dict:
    """An offloaded model's VAE and text encoders go to the training device for the run (the model is the
    training's share: the input keeps its weights in CPU memory); the denoiser follows with :func:`place_unet` once
    they have left (:func:`release_frozen`). Returns CPU shares of the VAE and text encoders to fall back on."""
    if not model.offload:
        return {}
    from ..model.deltas import share

    home = {name: share(m) for name, m in model.parts().items() if name != model.family.denoiser_part}
    for m in home:
        getattr(model, m).to(model.device)
    return home


def place_unet(model: FTModel, home: dict) -> None:
    """The denoiser of an offloaded model (``home`` from :func:`place_for_training`) joins what stayed on the
    device."""
    if home:
        model.denoiser.to(model.device)


def release_frozen(model: FTModel, enc, method, dataset: Dataset, home: dict) -> list[str]:
    """Once their outputs are cached, the VAE and the text encoder leave the training device (back to the shares of
    the CPU weights in ``home``): the VAE when the latents are cached, the text encoder when it does not train and
    the captions are a closed set (no shuffling), whose embeddings are computed first. A caption met later is
    encoded in CPU memory. Validation samples place the whole model for their time."""
    if not home:
        return []
    import gc

    left = []
    if enc.cache_latents:
        model.vae = home["vae"]
        left.append("VAE")
    if not method.trains_text_encoder and not dataset.shuffle_captions:
        with torch.no_grad():
            extra = {cap for pics in method.extra_sets().values() for _, cap in pics}  # DreamBooth's class prompts
            enc.text_embeddings(sorted(enc.closed_captions() | extra))
        for name in model.text_parts:
            setattr(model, name, home[name])
        left.append("text encoders" if len(model.text_parts) > 1 else "text encoder")
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return left
