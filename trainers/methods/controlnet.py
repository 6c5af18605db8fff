"""ControlNet training: every ControlNet weight learns against the frozen model, the condition made on the fly by a
preprocessor or paired from a conditions dataset."""
from __future__ import annotations

import copy

import torch

from ..adapters.controlnet.apply import Control
from ..adapters.controlnet.value import ControlNet, check_compatible, new_controlnet
from ..loop.distributed import SINGLE, Shard
from ..loop.training import Callbacks, Method
from ..model.model import FTModel
from ..config.recipes import ControlNetRecipe
from ..runs.run_dir import RunDir


class ControlNetMethod(Method):
    """Train a ControlNet (all its weights) against the frozen model; the condition comes from a preprocessor
    applied to each training picture on the fly, or from a paired conditions dataset."""

    name = "controlnet"

    def __init__(self, preprocessor: str | None = "canny", preprocessor_options: dict | None = None,
                 init: ControlNet | None = None, name: str = "controlnet"):
        from ..data.preprocess import PREPROCESSORS

        self.preprocessor = preprocessor
        self.options = dict(preprocessor_options or {})
        if preprocessor is not None:
            if preprocessor not in PREPROCESSORS:
                raise ValueError(f"preprocessor {preprocessor!r} is not known; choose one of: "
                                 f"{', '.join(PREPROCESSORS)}")
            PREPROCESSORS[preprocessor](torch.zeros(1, 8, 8, 3), **self.options)  # bad options fail now, not at step 1
        self.init = init
        self.run_name = name
        self.cn: ControlNet | None = None
        self.validation_condition: torch.Tensor | None = None

    def setup(self, model: FTModel) -> None:
        if self.init is not None:
            check_compatible(self.init, model, what="control_net")
            net = copy.deepcopy(self.init.net).float().to(model.device)
            self.cn = ControlNet(net, self.run_name, source=f"continued from {self.init.name}")
        else:
            self.cn = new_controlnet(model, self.run_name)
        self.cn.net.requires_grad_(True)

    def param_groups(self, cfg):
        return [{"params": [p for p in self.cn.net.parameters() if p.requires_grad], "lr": cfg.learning_rate}]

    def trainable_state(self):
        return dict(self.cn.net.state_dict())

    def load_trainable_state(self, state):
        self.cn.net.load_state_dict(state, strict=True)

    def train_modules(self, model):
        return [self.cn.net]

    def condition(self, batch) -> torch.Tensor:
        from ..data.preprocess import PREPROCESSORS

        if batch.conditions is not None:
            return batch.conditions
        if self.preprocessor is None:
            raise ValueError("the dataset has no paired conditions and no preprocessor was chosen")
        px = (batch.pixels.float() + 1) / 2
        img = PREPROCESSORS[self.preprocessor](px.permute(0, 2, 3, 1), **self.options)
        return img.permute(0, 3, 1, 2)

    def predict(self, model, noisy, t, context, batch):
        cond = self.condition(batch).to(noisy.device, noisy.dtype)
        if self.validation_condition is None:
            self.validation_condition = cond[:1].detach().float().cpu().permute(0, 2, 3, 1)
        kw = model.conditioning(noisy, context, batch.framing)
        down, mid = self.cn.net(noisy, t, controlnet_cond=cond, return_dict=False, **kw)
        return model.denoise(noisy, t, conditioning=kw, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)

    def sample_kwargs(self) -> dict:
        if self.validation_condition is None:
            return {}
        _, h, w, _ = self.validation_condition.shape  # drawn at the condition's own size (a bucket's, not a square)
        return {"controls": [Control(self.cn, self.validation_condition)], "height": h, "width": w}

    def result(self, name: str | None = None, metadata: dict | None = None) -> ControlNet:
        """The trained ControlNet as an independent value (eval mode, no gradients)."""
        net = copy.deepcopy(self.cn.net).eval().requires_grad_(False)
        return ControlNet(net, name or self.cn.name, source=self.cn.source, meta=dict(metadata or {}))


def train_controlnet(recipe: ControlNetRecipe, model: FTModel, dataset, run: RunDir,
                     callbacks: Callbacks | None = None, shard: Shard = SINGLE, *, init: ControlNet | None = None,
                     scorer=None):
    """Train a ControlNet for ``model``: returns a TrainResult whose result is the ControlNet (also kept in the run
    folder as ``controlnet.safetensors``, original layout, fp16). A dataset with paired conditions trains on them;
    otherwise the recipe's preprocessor makes each condition."""
    import json

    from ..adapters.controlnet.files import file_contents
    from ..loop.session import run_method, save_in_run

    paired = any(e.condition is not None for e in dataset.examples)
    if paired:
        method = ControlNetMethod(None, init=init, name=run.name)
    else:
        method = ControlNetMethod(recipe.preprocessor, recipe.preprocessor_options(), init=init, name=run.name)
    dataset = dataset.with_options(caption_dropout=recipe.caption_dropout)
    extra = {"controlnet": {"condition": "paired conditions" if paired else recipe.preprocessor,
                            "init": init.name if init is not None else "base UNet encoder"}}
    res = run_method(method, recipe, model, dataset, run, callbacks, shard, extra_config=extra, scorer=scorer)
    if res.cancelled:
        return res.handed_over(None, None)
    if model.offload:  # the result waits in CPU memory as the model does (ComfyUI caches it; sampling copies it)
        method.cn.net.to("cpu")
    cn = method.result(run.name, {"finetune_config": json.dumps(res.config, default=str)})
    cn.source = f"trained: run {run.name}, {res.step} steps"
    save_in_run(run, "controlnet", *file_contents(cn, layout="original", dtype="fp16"))
    return res.handed_over(model, cn)
