"""LoRA: train with peft, export in the kohya layout, merge into a model with a strength.

Training attaches peft ``LoraConfig`` adapters to the UNet (and optionally the text encoder) with peft's own
model-agnostic API (:mod:`.adapters`), never through diffusers' or transformers' adapter wrappers. The result is
kept as a :class:`LoRA` value holding the kohya-layout state dict that ComfyUI's
LoraLoader, diffusers' ``load_lora_weights``, A1111 and Forge read:

    lora_unet_<diffusers module path, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha
    lora_te_<transformers module path, dots as underscores>...

Applying a LoRA adds ``strength * alpha / rank * up @ down`` to each adapted weight live (:mod:`.deltas`): the
model it is applied to keeps its weights, and the result shares them instead of holding a merged copy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from . import adapters
from .deltas import LowRankDelta, attach
from .distributed import SINGLE, Shard
from .loop import Callbacks, Method
from .model import FTModel
from .recipes import LoRARecipe, TrainConfig
from .runs import RunDir

#: target presets: name -> (UNet module names, text-encoder module names); peft matches name suffixes
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (("to_q", "to_k", "to_v", "to_out.0"), ("q_proj", "k_proj", "v_proj", "out_proj")),
    "attention+feedforward": (("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                               "proj_out"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "attention+feedforward+conv": (("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                                    "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj"),
                                   ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
}
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@dataclass
class LoRA:
    """A trained or loaded LoRA (``FT_LORA``): kohya-layout tensors plus what is known about its training."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    name: str = "lora"
    metadata: dict = field(default_factory=dict)

    def modules(self) -> list[str]:
        return sorted({k.split(".")[0] for k in self.state})

    def __repr__(self) -> str:
        return f"LoRA({self.name!r}, rank {self.rank}, alpha {self.alpha}, {len(self.modules())} modules)"


def kohya_key(part: str, module_path: str) -> str:
    """The kohya name of a module. Text-encoder paths are spelled as transformers 4 named them
    (``text_model.encoder.layers...``): transformers 5 dropped the ``text_model`` level, the file format did not."""
    if part == "text_encoder" and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return PREFIX[part] + module_path.replace(".", "_")


def kohya_names(module: torch.nn.Module, part: str) -> dict[str, torch.nn.Module]:
    """kohya name -> module, for every module of ``module`` (``part`` is "unet" or "text_encoder")."""
    return {kohya_key(part, name): m for name, m in module.named_modules() if name}


class LoRAMethod(Method):
    name = "lora"

    def __init__(self, rank: int = 8, alpha: float = 8.0, targets: str = "attention", train_text_encoder: bool = False,
                 text_encoder_lr: float = 0.0, adapter_name: str = "ft_lora"):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha} (alpha = rank keeps the scale at 1)")
        if targets not in TARGETS:
            raise ValueError(f"target modules {targets!r} not known; choose one of: {', '.join(TARGETS)}")
        self.rank, self.alpha, self.targets = rank, float(alpha), targets
        self.trains_text_encoder = train_text_encoder
        self.text_encoder_lr = text_encoder_lr
        self.adapter = adapter_name
        self.model: FTModel | None = None

    @classmethod
    def from_recipe(cls, r: LoRARecipe) -> "LoRAMethod":
        return cls(r.rank, r.alpha, r.target_modules, r.train_text_encoder, r.text_encoder_lr)

    def _parts(self) -> list[tuple[str, torch.nn.Module]]:
        parts = [("unet", self.model.unet)]
        if self.trains_text_encoder:
            parts.append(("text_encoder", self.model.text_encoder))
        return parts

    def setup(self, model: FTModel) -> None:
        from peft import LoraConfig

        self.model = model
        self.check_rank(model)
        unet_t, te_t = TARGETS[self.targets]
        for part, mod in self._parts():
            cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                             target_modules=list(unet_t if part == "unet" else te_t))
            adapters.inject(mod, cfg, self.adapter)

    def check_rank(self, model: FTModel) -> None:
        """A rank above every adapted layer's own rank only adds weights that cannot learn more: refuse it."""
        unet_t, te_t = TARGETS[self.targets]
        cap = 0
        for part, mod in [("unet", model.unet)] + ([("text_encoder", model.text_encoder)]
                                                   if self.trains_text_encoder else []):
            wanted = unet_t if part == "unet" else te_t
            for name, m in mod.named_modules():
                if not any(name == t or name.endswith("." + t) for t in wanted):
                    continue
                w = getattr(m, "weight", None)
                if w is not None and w.ndim >= 2:
                    cap = max(cap, min(int(w.shape[0]), int(w[0].numel())))
        if cap and self.rank > cap:
            raise ValueError(f"rank {self.rank} is larger than any layer the LoRA adapts: the widest of this "
                             f"{model.family} model's '{self.targets}' layers has rank {cap}, so a higher rank only "
                             f"adds weights that cannot learn more; use a rank of at most {cap} (4-32 is usual)")

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        groups = []
        for part, mod in self._parts():
            ps = adapters.parameters(mod, self.adapter)
            for p in ps:
                p.requires_grad_(True)
            lr = self.text_encoder_lr if part == "text_encoder" and self.text_encoder_lr else cfg.learning_rate
            groups.append({"params": ps, "lr": lr, "name": part})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for part, mod in self._parts():
            for k, v in adapters.state(mod, self.adapter).items():
                out[f"{part}.{k}"] = v
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for part, mod in self._parts():
            sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            adapters.load_state(mod, sub, self.adapter)

    def export(self, name: str = "lora", metadata: dict | None = None) -> LoRA:
        """The trained adapter in the kohya layout."""
        state: dict[str, torch.Tensor] = {}
        for k, v in self.trainable_state().items():
            part, rest = k.split(".", 1)
            if ".lora_A." in rest:
                mod, kind = rest.split(".lora_A.")[0], "lora_down"
            elif ".lora_B." in rest:
                mod, kind = rest.split(".lora_B.")[0], "lora_up"
            else:
                continue
            key = kohya_key(part, mod)
            state[f"{key}.{kind}.weight"] = v.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(self.alpha)
        return LoRA(state, self.rank, self.alpha, name, dict(metadata or {}))

    def remove(self) -> None:
        """Take the peft layers out again, leaving the model exactly as before setup."""
        for _, mod in self._parts():
            adapters.remove(mod)

    def result(self, name: str, metadata: dict) -> "LoRA":
        """The trained LoRA (kohya layout); the adapter layers leave the model."""
        lora = self.export(name, metadata)
        self.remove()
        return lora


def train_lora(recipe: LoRARecipe, model: FTModel, dataset, run: RunDir, callbacks: Callbacks | None = None,
               shard: Shard = SINGLE):
    """Train a LoRA: returns a Trained with the model (LoRA applied, strength 1) and the LoRA; the LoRA is also
    kept in the run folder as ``lora.safetensors`` (kohya layout)."""
    from .export import lora_metadata
    from .session import Trained, result_metadata, run_method, save_in_run, settle

    method = LoRAMethod.from_recipe(recipe)
    res = run_method(method, recipe, model, dataset, run, callbacks, shard)
    if res.cancelled:
        return Trained(None, None, res)
    lora = method.result(run.name, result_metadata(res, dataset.resolution or model.native_size))
    save_in_run(run, "lora", lora.state, lora_metadata(lora))
    tuned = attach_lora(settle(res.model, model, method), lora, 1.0)  # res.model is the training's own share
    tuned.history[-1] = {"trained": "lora", "run": run.name, "steps": res.step, "rank": recipe.rank}
    return Trained(tuned, lora, res)


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return LowRankDelta(down, up, 1.0).delta()


def attach_lora(model: FTModel, lora: LoRA, strength: float = 1.0) -> FTModel:
    """Apply ``lora`` live to ``model`` itself (one this code owns, such as a training's copy): every adapted layer
    computes ``weight + strength * alpha / rank * up @ down`` when it runs; its base weight is not changed. Unknown
    module names and shapes are an error."""
    targets = {**kohya_names(model.unet, "unet"), **kohya_names(model.text_encoder, "text_encoder")}
    prefixes = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora.state})
    unknown = [p for p in prefixes if p not in targets]
    if unknown:
        raise ValueError(f"LoRA {lora.name!r} does not fit this {model.family} model: {len(unknown)} of its "
                         f"{len(prefixes)} modules are not in it (e.g. {', '.join(unknown[:3])}). Was it trained "
                         "for another base model?")
    deltas = []
    for p in prefixes:
        down, up = lora.state[f"{p}.lora_down.weight"], lora.state[f"{p}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(lora.state[f"{p}.alpha"]) if f"{p}.alpha" in lora.state else float(rank)
        d = LowRankDelta(down, up, strength * alpha / rank)
        w = targets[p].weight
        if d.delta().shape != w.shape:
            raise ValueError(f"LoRA {lora.name!r}: module {p} has shape {tuple(d.delta().shape)}, the model's is "
                             f"{tuple(w.shape)}: it was trained for another base model")
        deltas.append((targets[p], d))
    with torch.no_grad():
        for module, d in deltas:
            attach(module, d)
    model.history = model.history + [{"applied_lora": lora.name, "strength": strength, "rank": lora.rank}]
    return model


def apply_lora(model: FTModel, lora: LoRA, strength: float = 1.0) -> FTModel:
    """``model`` with ``lora`` applied at ``strength``, as a new model that shares every base weight with
    ``model`` (which is not changed): chains of LoRAs cost only their own tensors."""
    return attach_lora(model.share(), lora, strength)


def lora_from_state(state: dict[str, torch.Tensor], name: str, metadata: dict | None = None) -> LoRA:
    downs = [v for k, v in state.items() if k.endswith(".lora_down.weight")]
    if not downs or not all(k.startswith(tuple(PREFIX.values())) for k in state):
        bad = [k for k in state if not k.startswith(tuple(PREFIX.values()))][:3]
        raise ValueError(f"{name}: not a kohya-layout SD LoRA (expected keys lora_unet_*/lora_te_* with "
                         f".lora_down.weight/.lora_up.weight; found {bad or list(state)[:3]})")
    rank = int(downs[0].shape[0])
    alphas = [float(v) for k, v in state.items() if k.endswith(".alpha")]
    meta = dict(metadata or {})
    if "finetune_config" in meta:
        try:
            meta["finetune_config"] = json.loads(meta["finetune_config"])
        except ValueError:
            pass
    return LoRA(state, rank, alphas[0] if alphas else float(rank), name, meta)
