"""What a checkpoint holds besides the trained tensors, in one place: the optimizer, the LR schedule, the grad
scaler, the run's generator, the position in the data and the moving average. :class:`LoopState` writes it with the
method's trainable tensors and reads it back, so a resumed run (or the best checkpoint kept as the result) continues
bit for bit on the CPU. Only a checkpoint that is whole (its files match its manifest) and reads is used: a resume
takes the newest such one, and keep_best the best-scoring such one, each saying what it skipped and why."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runs.integrity import DamagedCheckpoint
from ..runs.run_dir import load_checkpoint, newest_usable, save_checkpoint


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

    def resume(self, run, steps: int) -> tuple[int, list[dict]]:
        """(step, log rows) of the newest checkpoint of ``run`` that is whole and reads, loaded: newer damaged ones
        are skipped (said in the log and in status.json) and their steps train again; none usable is an error
        naming each one's damage. A run with more steps done than ``steps`` is an error too, never "step 4 of 3"."""
        step, folder, read, skipped = newest_usable(run)
        for why in skipped:
            run.warn(f"resume_run {run.name!r}: skipped the damaged checkpoint {run.path / 'checkpoints'}/{why}. "
                     f"Resumed from {folder.name} instead: the steps after {step} train again")
        if step > steps:
            raise ValueError(fewer_steps(run, step, steps))
        return step, self.apply(read, run.name)

    def load_best(self, run, history: list[dict], at: int) -> dict:
        """keep_best: load the best-scoring checkpoint of ``history`` (rows with "step" and "score") and return its
        row. A damaged one is skipped for the next best (said in the log and in status.json), down to step ``at``,
        whose weights are the ones in memory."""
        folders = dict(run.checkpoint_folders())
        ranked = sorted(history, key=lambda r: -r["score"])  # ties: the earlier step, as BestKeeper.record keeps
        for row in ranked:
            if row["step"] == at:
                return row
            try:
                if row["step"] not in folders:
                    raise DamagedCheckpoint(f"step-{row['step']}: the folder is missing")
                self.load(folders[row["step"]], run.name)
                return row
            except DamagedCheckpoint as e:
                run.warn(f"keep_best: skipped the damaged checkpoint {run.path / 'checkpoints'}/{e} (score "
                         f"{row['score']}); the next best is the result instead")
        return {"step": at, "score": float("-inf")}  # never reached: finish() scores the last step

    def load(self, folder: Path, run_name: str) -> list[dict]:
        """Everything back from checkpoint ``folder``; returns the log rows it kept. A damaged checkpoint is a
        :class:`~..runs.integrity.DamagedCheckpoint`, raised before anything is changed."""
        return self.apply(load_checkpoint(folder), run_name)

    def apply(self, read: tuple, run_name: str) -> list[dict]:
        """Everything back from what :func:`~..runs.run_dir.load_checkpoint` read; returns the log rows."""
        trainable, st, log_rows = read
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


def fewer_steps(run, done: int, steps: int) -> str:
    """The error for a resume asking for fewer steps than the run has done."""
    results = sorted(p.name for p in run.path.glob("*.safetensors"))
    use = (f"use the run's result as it is ({', '.join(results)} in {run.path})" if results else
           f"use its checkpoint as it is ({run.path / 'checkpoints' / f'step-{done}'})")
    return (f"resume_run {run.name!r} has already trained {done} steps, more than steps {steps} asks for (steps "
            f"counts the whole run, the steps done included): set steps above {done} to train further (--steps in "
            f"the shell), or {use}")
