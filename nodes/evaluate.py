"""finetune/evaluate: look at what training did."""
from __future__ import annotations

from .base import INT, LINK, ROOT_CATEGORY, torch_call

CATEGORY = f"{ROOT_CATEGORY}/evaluate"


class FT_LossPlot:
    DESCRIPTION = "The training loss per step (raw, and smoothed with an exponential moving average) as an IMAGE."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The loss curve, for PreviewImage or SaveImage.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "log": LINK("FT_TRAINING_LOG", "The training log of a training node."),
            "width": INT(768, 256, 4096, "Picture width in pixels.", step=16),
            "height": INT(384, 128, 4096, "Picture height in pixels.", step=16),
        }}

    @torch_call
    def execute(self, log, width, height):
        import numpy as np
        import torch

        from ..trainers.plots import loss_plot

        img = loss_plot(log.losses(), width, height, title=f"{log.run}: {log.steps} steps")
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None],)
