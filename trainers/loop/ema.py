"""An exponential moving average of the trained weights (``ema_decay`` > 0): smoother than the last step's weights,
it is what validation pictures are made with and what the training hands on, as in OneTrainer, ai-toolkit and
SimpleTuner.

Before ``ema_start`` the average simply follows the weights; from then on, every ``ema_every`` optimizer steps,
``ema = decay * ema + (1 - decay) * weights`` (kept in fp32). Its tensors are part of every checkpoint, so a resumed
run continues the same average.
"""
from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, start: int = 0, every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (0 = off), got {decay}")
        self.params, self.decay, self.start, self.every = params, float(decay), int(start), max(1, int(every))
        self.shadow = [p.detach().float().clone() for p in params]

    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        with torch.no_grad():
            if step <= self.start:
                for s, p in zip(self.shadow, self.params):
                    s.copy_(p.detach().float())
            elif (step - self.start) % self.every == 0:
                for s, p in zip(self.shadow, self.params):
                    s.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"shadow": [s.to("cpu", copy=True) for s in self.shadow], "decay": self.decay, "start": self.start,
                "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"the checkpoint's average has {len(state['shadow'])} tensors, this training "
                             f"{len(self.shadow)}")
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)

    def copy_to_params(self) -> None:
        """The weights take the average's values (at the end of a training)."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))


@contextlib.contextmanager
def swapped_in(ema: EMA | None):
    """The average's values in the weights for the block (validation pictures), then exactly the weights they were;
    a no-op without an average."""
    if ema is None:
        yield
        return
    from .state import weights_kept

    with weights_kept(ema.params):
        ema.copy_to_params()
        yield
