"""The optimizers a recipe can name, and their learning-rate schedules.

AdamW (the default), Adam, SGD and RMSprop come with torch. The others are what people come to other trainers for,
each from its own well-kept package, an optional extra (``pip install "comfyui-finetune[optimizers]"``):

- **prodigy** (``prodigyopt``): estimates its own step size; ``learning_rate`` is a multiplier (1.0 as usual), with
  bias correction and the warm-up safeguard on, weight decay decoupled as in AdamW;
- **adafactor** (transformers, no extra package): factored second moments, little memory; a fixed learning rate
  (relative step off), or its own relative-step schedule with ``lr_scheduler`` "adafactor";
- **adamw8bit** (``bitsandbytes``): AdamW with 8-bit optimizer states (a quarter of the memory);
- **schedulefree_adamw** (``schedulefree``): AdamW without a schedule; its weights are switched to their averaged
  ("eval") values for validation, saving and the result, and back for training;
- **lion** (``lion-pytorch``): sign updates, one state per weight (use ~3-10x lower learning rates than AdamW).

Choosing one whose package is missing is an error that names the ``pip install`` that fixes it.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

EXTRA = 'pip install "comfyui-finetune[optimizers]"'


@dataclass(frozen=True)
class Spec:
    build: Callable  # (groups, cfg) -> optimizer
    package: str = ""  #: the module it needs ("" = torch or a dependency)
    pip: str = ""  #: what to install
    schedule_free: bool = False
    #: a learning rate left to auto, for this optimizer: the AdamW rate -> (its rate, why)
    auto_lr: Callable[[float], tuple[float, str]] | None = None


def _fused(groups: list[dict]) -> bool | None:
    """torch's fused Adam / AdamW (one kernel for all tensors: the same update in a fraction of the launches; on the
    CPU 2.5x faster than the per-tensor loop, since torch 2.4) where every weight is on the GPU or every one on the
    CPU; None (torch's default) elsewhere."""
    kinds = {p.device.type for grp in groups for p in grp["params"]}
    return True if kinds in ({"cuda"}, {"cpu"}) else None


def _module(name: str, optimizer: str):
    spec = OPTIMIZERS[optimizer]
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ModuleNotFoundError(f"optimizer {optimizer!r} needs the {spec.pip} package, which is not installed: "
                                  f"pip install {spec.pip} (or {EXTRA}), then run again") from None


def _prodigy(groups, cfg):
    return _module("prodigyopt", "prodigy").Prodigy(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                                   decouple=True, use_bias_correction=True, safeguard_warmup=True)


def _adafactor(groups, cfg):
    from transformers.optimization import Adafactor

    if cfg.lr_scheduler == "adafactor":  # its own relative-step schedule: the learning rate comes from the step
        return Adafactor(groups, lr=None, scale_parameter=True, relative_step=True, warmup_init=True,
                         weight_decay=cfg.weight_decay)
    return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=cfg.weight_decay)


def _adamw8bit(groups, cfg):
    return _module("bitsandbytes", "adamw8bit").optim.AdamW8bit(groups, lr=cfg.learning_rate,
                                                                weight_decay=cfg.weight_decay)


def _schedulefree(groups, cfg):
    return _module("schedulefree", "schedulefree_adamw").AdamWScheduleFree(
        groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)


def _lion(groups, cfg):
    return _module("lion_pytorch", "lion").Lion(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Spec] = {
    "adamw": Spec(lambda g, c: torch.optim.AdamW(g, lr=c.learning_rate, weight_decay=c.weight_decay,
                                                 fused=_fused(g))),
    "adam": Spec(lambda g, c: torch.optim.Adam(g, lr=c.learning_rate, weight_decay=c.weight_decay, fused=_fused(g))),
    "sgd": Spec(lambda g, c: torch.optim.SGD(g, lr=c.learning_rate, momentum=0.9, weight_decay=c.weight_decay)),
    "rmsprop": Spec(lambda g, c: torch.optim.RMSprop(g, lr=c.learning_rate, weight_decay=c.weight_decay)),
    "prodigy": Spec(_prodigy, "prodigyopt", "prodigyopt",
                    auto_lr=lambda lr: (1.0, "prodigy finds its own step size, 1.0 is its multiplier")),
    "adafactor": Spec(_adafactor),
    "adamw8bit": Spec(_adamw8bit, "bitsandbytes", "bitsandbytes"),
    "schedulefree_adamw": Spec(_schedulefree, "schedulefree", "schedulefree", schedule_free=True),
    "lion": Spec(_lion, "lion_pytorch", "lion-pytorch",
                 auto_lr=lambda lr: (lr / 3, "/3 for lion, whose sign updates are larger (its paper: 3-10x lower)")),
}
#: names understood by diffusers.optimization.get_scheduler, and Adafactor's own
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "adafactor")


def make(groups: list[dict], cfg) -> tuple[torch.optim.Optimizer, object]:
    """The optimizer over ``groups`` and its learning-rate schedule."""
    opt = OPTIMIZERS[cfg.optimizer].build(groups, cfg)
    if cfg.lr_scheduler == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return opt, AdafactorSchedule(opt)
    from diffusers.optimization import get_scheduler

    return opt, get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)


def is_schedule_free(opt) -> bool:
    return type(opt).__name__.endswith("ScheduleFree")


def for_training(opt) -> None:
    """A schedule-free optimizer's weights to their training values (a no-op for the others)."""
    if is_schedule_free(opt):
        opt.train()


@contextlib.contextmanager
def averaged(opt, params: list[torch.nn.Parameter]):
    """A schedule-free optimizer's weights at their averaged values for the block (validation pictures), then back to
    exactly the training values they had; a no-op for other optimizers."""
    if not is_schedule_free(opt):
        yield
        return
    from .state import weights_kept

    with weights_kept(params):
        opt.eval()
        try:
            yield
        finally:
            opt.train()


def finish(opt) -> None:
    """After the last step: a schedule-free optimizer's weights take their averaged values (what is saved and
    handed on)."""
    if is_schedule_free(opt):
        opt.eval()
