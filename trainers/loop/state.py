"""What a checkpoint holds besides the trained tensors, in one place: the optimizer, the LR schedule, the grad
scaler, the run's generator, the position in the data and the moving average. :class:`LoopState` writes it with the
method's trainable tensors and reads it back, so a resumed run (or the best checkpoint kept as the result) continues
bit for bit on the CPU."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runs.run_dir import load_checkpoint, save_checkpoint


@contextlib.contextmanager
def weights_kept(params: list[torch.nn.Parameter]):
    """The trained weights exactly as they are now, put back after the block whatever it did to them (a validation
    with averaged weights swapped in never changes the run)."""
    saved = [p.detach().to("cpu", copy=True) for p in params]  # in CPU memory: a full fine-tune's copy is GBs
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@dataclass
class LoopState:
    method: Any
    opt: Any
    sched: Any
    scaler: Any
    g: Any  #: the run's torch.Generator
    batches: Any
    ema: Any = None

    def save(self, run, step: int, log_rows: list[dict]) -> Path:
        state = {"optimizer": self.opt.state_dict(), "lr_scheduler": self.sched.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": self.g.get_state(),
                 "data": self.batches.state(), "ema": self.ema.state_dict() if self.ema is not None else None}
        return save_checkpoint(run, step, self.method.name, self.method.trainable_state(), state, log_rows)

    def load(self, folder: Path, run_name: str) -> list[dict]:
        """Everything back from checkpoint ``folder``; returns the log rows it kept."""
        trainable, st, log_rows = load_checkpoint(folder)
        self.method.load_trainable_state(trainable)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["lr_scheduler"])
        if self.ema is not None:
            if not st.get("ema"):
                raise ValueError(f"resume_run {run_name!r} was trained without ema_decay: resume it with "
                                 "ema_decay 0, or start a new run")
            self.ema.load_state_dict(st["ema"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.g.set_state(st["rng"])
        self.batches.load(st["data"])
        return log_rows
