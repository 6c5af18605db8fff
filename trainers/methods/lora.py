"""LoRA, LoHa, LoKr and DoRA: train with peft, export in the kohya / LyCORIS layout, apply live with a strength.

Training attaches peft ``LoraConfig`` (``LoHaConfig``, ``LoKrConfig``) adapters to the UNet (and optionally the
text encoder) with peft's own model-agnostic API (:mod:`..adapters.tuners`), never through diffusers' or transformers'
adapter wrappers. The result is kept as a :class:`LoRA` value holding the kohya-layout state dict that ComfyUI's
LoraLoader, diffusers' ``load_lora_weights``, A1111 and Forge read:

    lora_unet_<diffusers module path, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha
    lora_te_<transformers module path, dots as underscores>...
    (LoHa: .hada_w1_a / .hada_w1_b / .hada_w2_a / .hada_w2_b; LoKr: .lokr_w1[_a/_b] / .lokr_w2[_a/_b]; both .alpha;
    DoRA: a LoRA's tensors plus .dora_scale, the input-axis magnitude of :mod:`..adapters.dora`)

Applying a LoRA adds ``strength * alpha / rank * up @ down`` to each adapted weight live (:mod:`..model.deltas`): the
model it is applied to keeps its weights, and the result shares them instead of holding a merged copy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..adapters import tuners as adapters, dora
from ..adapters.kinds import KINDS
from ..families.registry import LORA_PREFIXES
from ..families.sd import sd_lora_key
from ..model.deltas import DecomposedDelta, HadamardDelta, KroneckerDelta, LowRankDelta, attach
from ..loop.distributed import SINGLE, Shard
from ..loop.training import Callbacks, Method
from ..model.model import FTModel
from ..config.recipes import LoRARecipe, TrainConfig
from ..runs.run_dir import RunDir

#: Z-Image's feed-forward (a SwiGLU: w1 and w3 in, w2 out) in every block: the noise and context refiners and the
#: main layers
ZIMAGE_FF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
#: Qwen3's feed-forward (Z-Image's text encoder; its attention output is o_proj)
QWEN_FF = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
#: target presets: name -> (denoiser module names, text-encoder module names); peft matches name suffixes. The
#: attention names are the UNet's and Z-Image's alike (diffusers' to_q / to_k / to_v / to_out.0); adaln is
#: Z-Image's per-block modulation (adaLN_modulation.0, in the main layers and the noise refiner)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
#: the text encoders' attention (CLIP's out_proj, Qwen3's o_proj) and feed-forward (CLIP's fc1 / fc2, Qwen3's)
TE_ATTENTION, TE_FF = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj"), ("fc1", "fc2", *QWEN_FF)
UNET_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (ATTENTION, TE_ATTENTION),
    "attention+feedforward": ((*ATTENTION, *UNET_FF, *ZIMAGE_FF), (*TE_ATTENTION, *TE_FF)),
    "attention+feedforward+conv": ((*ATTENTION, *UNET_FF, *UNET_CONV, *ZIMAGE_FF), (*TE_ATTENTION, *TE_FF)),
    "attention+feedforward+adaln": ((*ATTENTION, *ZIMAGE_FF, "adaLN_modulation.0"), (*TE_ATTENTION, *TE_FF)),
}
#: the node's choices: "auto" (the family's preset for the method, ``Family.lora_targets``) or a preset
TARGET_CHOICES = ("auto", *TARGETS)
#: the tensors of each kind in a file, after the module's kohya name (``<name>.<suffix>``)
SUFFIXES = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}


@dataclass
class LoRA:
    """A trained or loaded LoRA (``FT_LORA``): kohya-layout tensors plus what is known about its training."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    name: str = "lora"
    metadata: dict = field(default_factory=dict)
    kind: str = "lora"  #: "lora", "loha", "lokr" or "dora" (see KINDS)

    def modules(self) -> list[str]:
        return sorted({split_key(k)[0] for k in self.state})

    def __repr__(self) -> str:
        kind = "" if self.kind == "lora" else f"{self.kind}, "
        return f"LoRA({self.name!r}, {kind}rank {self.rank}, alpha {self.alpha}, {len(self.modules())} modules)"


def adaptable(module: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """The names of ``module``'s layers a preset's ``suffixes`` name that an adapter can wrap (linear layers and
    convolutions): Z-Image's ``adaLN_modulation.0`` is a block's linear layer, but the final layer's SiLU."""
    return [name for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in suffixes)]


def split_key(key: str) -> tuple[str, str]:
    """(module name, tensor suffix) of a LoRA file's key: the suffix is one of the kinds' tensor names (two dotted
    parts for ``lora_down.weight`` / ``lora_up.weight``), the module name the rest, dots and all (Z-Image's
    ``diffusion_model.layers.0.attention.to_q``; kohya's SD names have none)."""
    head, _, last = key.rpartition(".")
    if last == "weight":
        head, _, kind = head.rpartition(".")
        return head, f"{kind}.{last}"
    return head, last


def kohya_key(part: str, module_path: str, model: FTModel | None = None) -> str:
    """The kohya name of a module of ``part``, as ``model``'s family writes it in LoRA files (SD 1.x's names when no
    model is given): SD's ``lora_unet_<diffusers path>`` / ``lora_te_...``, SDXL's ``lora_te1_`` / ``lora_te2_`` and
    original (LDM) UNet block names, as kohya's sd-scripts writes them."""
    return sd_lora_key(part, module_path) if model is None else model.family.lora_key(model, part, module_path)


def kohya_names(module: torch.nn.Module, part: str, model: FTModel | None = None) -> dict[str, torch.nn.Module]:
    """kohya name -> module, for every module of ``module`` that has a weight (``part``: "unet", "text_encoder"
    or another text-encoder part of the family; ``model``: the model it belongs to, whose family names them)."""
    out = {}
    for name, m in module.named_modules():
        if name and isinstance(getattr(m, "weight", None), torch.Tensor):
            try:
                out[kohya_key(part, name, model)] = m
            except KeyError:  # a module the original layout has no name for (none that a LoRA adapts)
                continue
    return out


def model_kohya_names(model: FTModel) -> dict[str, torch.nn.Module]:
    """kohya name -> module over every part of ``model`` a LoRA may adapt."""
    out = {}
    for part, mod in model.parts().items():
        if part != "vae":
            out.update(kohya_names(mod, part, model))
    return out


class LoRAMethod(Method):
    name = "lora"

    def __init__(self, rank: int = 8, alpha: float = 8.0, targets: str = "attention", train_text_encoder: bool = False,
                 text_encoder_lr: float = 0.0, adapter_name: str = "ft_lora", kind: str = "lora"):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha} (alpha = rank keeps the scale at 1)")
        if targets not in TARGETS:
            raise ValueError(f"target modules {targets!r} not known; choose one of: {', '.join(TARGETS)}")
        if kind not in KINDS:
            raise ValueError(f"adapter {kind!r} not known; choose one of: {', '.join(KINDS)}")
        self.kind = kind
        self.rank, self.alpha, self.targets = rank, float(alpha), targets
        self.trains_text_encoder = train_text_encoder
        self.text_encoder_lr = text_encoder_lr
        self.adapter = adapter_name
        self.model: FTModel | None = None
        self.magnitudes: dict[str, dora.Magnitudes] = {}  #: DoRA: part -> its magnitudes

    @classmethod
    def from_recipe(cls, r: LoRARecipe) -> "LoRAMethod":
        return cls(r.rank, r.alpha, r.target_modules, r.train_text_encoder, r.text_encoder_lr, kind=r.adapter)

    def _parts(self, model: FTModel | None = None) -> list[tuple[str, torch.nn.Module]]:
        model = model or self.model
        parts = [(model.family.denoiser_part, model.denoiser)]
        if self.trains_text_encoder:  # every text encoder (SDXL: both)
            parts += [(n, getattr(model, n)) for n in model.text_parts]
        return parts

    def setup(self, model: FTModel) -> None:
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        self.model = model
        self.check_rank(model)
        unet_t, te_t = TARGETS[self.targets]
        for part, mod in self._parts():
            targets = adaptable(mod, unet_t if part == model.family.denoiser_part else te_t)
            if self.kind == "loha":
                cfg = LoHaConfig(r=self.rank, alpha=self.alpha, target_modules=targets)
            elif self.kind == "lokr":
                cfg = LoKrConfig(r=self.rank, alpha=self.alpha, target_modules=targets)
            else:
                cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                                 target_modules=targets)
            adapters.inject(mod, cfg, self.adapter)
            if self.kind == "dora":
                self.magnitudes[part] = dora.Magnitudes(mod, self.adapter)

    def check_rank(self, model: FTModel) -> None:
        """A rank above every adapted layer's own rank only adds weights that cannot learn more: refuse it."""
        unet_t, te_t = TARGETS[self.targets]
        cap = 0
        for part, mod in self._parts(model):
            modules = dict(mod.named_modules())
            for name in adaptable(mod, unet_t if part == model.family.denoiser_part else te_t):
                w = getattr(modules[name], "weight", None)
                if w is not None and w.ndim >= 2:
                    cap = max(cap, min(int(w.shape[0]), int(w[0].numel())))
        if cap and self.rank > cap:
            raise ValueError(f"rank {self.rank} is larger than any layer the LoRA adapts: the widest of this "
                             f"{model.family.name} model's '{self.targets}' layers has rank {cap}, so a higher rank only "
                             f"adds weights that cannot learn more; use a rank of at most {cap} (4-32 is usual)")

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        groups = []
        for part, mod in self._parts():
            ps = adapters.parameters(mod, self.adapter)
            if part in self.magnitudes:
                ps = ps + self.magnitudes[part].parameters()
            for p in ps:
                p.requires_grad_(True)
            lr = self.text_encoder_lr if part.startswith("text_encoder") and self.text_encoder_lr else cfg.learning_rate
            groups.append({"params": ps, "lr": lr, "name": part})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for part, mod in self._parts():
            tensors = adapters.state(mod, self.adapter)
            if part in self.magnitudes:  # some peft versions list every tensor on their layers: ours go by name
                tensors = {k: v for k, v in tensors.items() if not k.endswith("." + dora.ATTR)}
                tensors.update(self.magnitudes[part].state())
            for k, v in tensors.items():
                out[f"{part}.{k}"] = v
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for part, mod in self._parts():
            sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            if part in self.magnitudes:
                self.magnitudes[part].load_state({k: v for k, v in sub.items() if k.endswith("." + dora.SUFFIX)})
                sub = {k: v for k, v in sub.items() if not k.endswith("." + dora.SUFFIX)}
            adapters.load_state(mod, sub, self.adapter)

    def export(self, name: str = "lora", metadata: dict | None = None) -> LoRA:
        """The trained adapter in the kohya layout (LyCORIS key names for LoHa and LoKr, ``dora_scale`` for DoRA)."""
        state: dict[str, torch.Tensor] = {}
        for k, v in self.trainable_state().items():
            part, rest = k.split(".", 1)
            if rest.endswith("." + dora.SUFFIX):
                mod, suffix = rest[:-len(dora.SUFFIX) - 1], dora.SUFFIX
            elif self.kind in ("lora", "dora"):
                if ".lora_A." in rest:
                    mod, suffix = rest.split(".lora_A.")[0], "lora_down.weight"
                elif ".lora_B." in rest:
                    mod, suffix = rest.split(".lora_B.")[0], "lora_up.weight"
                else:
                    continue
            else:
                mod, _, suffix = rest.rpartition(".")
                if suffix not in SUFFIXES[self.kind]:
                    continue
            key = kohya_key(part, mod, self.model)
            state[f"{key}.{suffix}"] = v.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(self.alpha)
        if self.kind == "lokr":  # readers scale by alpha / rank only where a factor is low-rank: fold it in elsewhere
            for key in {k.rsplit(".", 1)[0] for k in state}:
                if f"{key}.lokr_w1_a" not in state and f"{key}.lokr_w2_a" not in state:
                    state[f"{key}.lokr_w2"] = state[f"{key}.lokr_w2"] * (self.alpha / self.rank)
        return LoRA(state, self.rank, self.alpha, name, dict(metadata or {}), kind=self.kind)

    def remove(self) -> None:
        """Take the peft layers out again, leaving the model exactly as before setup."""
        for m in self.magnitudes.values():
            m.remove()
        self.magnitudes = {}
        for _, mod in self._parts():
            adapters.remove(mod)

    def result(self, name: str, metadata: dict) -> "LoRA":
        """The trained LoRA (kohya layout); the adapter layers leave the model."""
        lora = self.export(name, metadata)
        self.remove()
        return lora


def train_lora(recipe: LoRARecipe, model: FTModel, dataset, run: RunDir, callbacks: Callbacks | None = None,
               shard: Shard = SINGLE, *, scorer=None):
    """Train a LoRA: returns a TrainResult with the model (LoRA applied, strength 1) and the LoRA; the LoRA is also
    kept in the run folder as ``lora.safetensors`` (kohya layout)."""
    from ..runs.export import lora_metadata
    from ..loop.session import resolve_auto, result_metadata, run_method, save_in_run, settle

    recipe, chosen = resolve_auto(recipe, model, None)  # the adapter is built with what auto picks
    method = LoRAMethod.from_recipe(recipe)
    res = run_method(method, recipe, model, dataset, run, callbacks, shard, extra_config=chosen, scorer=scorer)
    if res.cancelled:
        return res.handed_over(None, None)
    lora = method.result(run.name, result_metadata(res, dataset.resolution or model.native_size))
    save_in_run(run, "lora", lora.state, lora_metadata(lora))
    tuned = attach_lora(settle(res.model, model, method), lora, 1.0)  # res.model is the training's own share
    tuned.history[-1] = {"trained": "lora", "run": run.name, "steps": res.step, "rank": recipe.rank}
    return res.handed_over(tuned, lora)


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return LowRankDelta(down, up, 1.0).delta()


def attach_lora(model: FTModel, lora: LoRA, strength: float = 1.0) -> FTModel:
    """Apply ``lora`` live to ``model`` itself (one this code owns, such as a training's copy): every adapted layer
    computes ``weight + strength * delta`` when it runs (:func:`module_delta`); its base weight is not changed.
    Unknown module names and shapes are an error."""
    targets = model_kohya_names(model)
    prefixes = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora.state})
    unknown = [p for p in prefixes if p not in targets]
    if unknown:
        raise ValueError(f"LoRA {lora.name!r} does not fit this {model.family.name} model: {len(unknown)} of its "
                         f"{len(prefixes)} modules are not in it (e.g. {', '.join(unknown[:3])}). Was it trained "
                         "for another base model?")
    deltas = []
    for p in prefixes:
        d = module_delta(lora.state, p, strength)
        w = targets[p].weight
        if d.delta().numel() != w.numel() or (d.delta().ndim == w.ndim and d.delta().shape != w.shape):
            raise ValueError(f"LoRA {lora.name!r}: module {p} has shape {tuple(d.delta().shape)}, the model's is "
                             f"{tuple(w.shape)}: it was trained for another base model")
        deltas.append((targets[p], d))
    with torch.no_grad():
        for module, d in deltas:
            attach(module, d)
    model.history = model.history + [{"applied_lora": lora.name, "strength": strength, "rank": lora.rank}]
    return model


def module_delta(state: dict[str, torch.Tensor], p: str, strength: float) -> LowRankDelta | DecomposedDelta:
    """The weight change of module ``p`` of a file, as ComfyUI's LoraLoader computes it: LoRA ``alpha / rank * up @
    down``; LoHa ``alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)``; LoKr ``kron(w1, w2)``, times ``alpha / rank``
    when a factor is a low-rank pair (no ``alpha``: rank for rank, a scale of 1). With a ``dora_scale`` the change
    is weight-decomposed (DoRA, :class:`.deltas.DecomposedDelta`) and ``strength`` applies to the result."""
    if f"{p}.{dora.SUFFIX}" in state:
        return DecomposedDelta(_delta(state, p, 1.0), state[f"{p}.{dora.SUFFIX}"], strength)
    return _delta(state, p, strength)


def _delta(state: dict[str, torch.Tensor], p: str, strength: float) -> LowRankDelta:
    alpha = float(state[f"{p}.alpha"]) if f"{p}.alpha" in state else None
    if f"{p}.hada_w1_a" in state:
        w1_b = state[f"{p}.hada_w1_b"]
        return HadamardDelta(state[f"{p}.hada_w1_a"], w1_b, state[f"{p}.hada_w2_a"], state[f"{p}.hada_w2_b"],
                             strength * (alpha / w1_b.shape[0] if alpha is not None else 1.0))
    if any(f"{p}.{k}" in state for k in SUFFIXES["lokr"]):
        factors, dim = {}, None
        for f in ("w1", "w2"):
            if f"{p}.lokr_{f}" in state:
                factors[f] = state[f"{p}.lokr_{f}"]
            else:
                factors[f] = (state[f"{p}.lokr_{f}_a"], state[f"{p}.lokr_{f}_b"])
                dim = factors[f][1].shape[0]
        return KroneckerDelta(factors["w1"], factors["w2"],
                              strength * (alpha / dim if alpha is not None and dim else 1.0))
    down, up = state[f"{p}.lora_down.weight"], state[f"{p}.lora_up.weight"]
    rank = down.shape[0]
    return LowRankDelta(down, up, strength * (alpha if alpha is not None else rank) / rank)


def apply_lora(model: FTModel, lora: LoRA, strength: float = 1.0) -> FTModel:
    """``model`` with ``lora`` applied at ``strength``, as a new model that shares every base weight with
    ``model`` (which is not changed): chains of LoRAs cost only their own tensors."""
    return attach_lora(model.share(), lora, strength)


def _missing(keys: set[str]) -> list[str]:
    """What one module's tensors lack to make a weight change (by the adapter kind they are of)."""
    if keys & set(SUFFIXES["loha"]):
        return sorted(set(SUFFIXES["loha"]) - keys)
    if keys & set(SUFFIXES["lokr"]):
        return [f"lokr_{f} or lokr_{f}_a + lokr_{f}_b" for f in ("w1", "w2")
                if f"lokr_{f}" not in keys and not {f"lokr_{f}_a", f"lokr_{f}_b"} <= keys]
    return sorted({"lora_down.weight", "lora_up.weight"} - keys)


def _check_whole(state: dict[str, torch.Tensor], name: str) -> None:
    """Every module of a LoRA file has all the tensors its kind needs (a pair cut in half is a damaged file)."""
    by_module: dict[str, set[str]] = {}
    for k in state:
        module, suffix = split_key(k)
        by_module.setdefault(module, set()).add(suffix)
    broken = {m: _missing(keys) for m, keys in by_module.items() if _missing(keys)}
    if broken:
        m, lack = next(iter(broken.items()))
        raise ValueError(f"{name}: {len(broken)} of its {len(by_module)} modules are incomplete (e.g. {m} has no "
                         f"{', '.join(lack)}): the file is damaged or was cut; download or save it again")


def lora_from_state(state: dict[str, torch.Tensor], name: str, metadata: dict | None = None) -> LoRA:
    """A LoRA, LoHa, LoKr or DoRA file in the kohya / LyCORIS layout (``lora_unet_*`` / ``lora_te_*`` module names)."""
    known = (".lora_down.weight", ".lora_up.weight", ".alpha", f".{dora.SUFFIX}")
    known += tuple(f".{x}" for xs in SUFFIXES.values() for x in xs)
    bad = [k for k in state if not k.startswith(LORA_PREFIXES)
           or not k.endswith(known)]
    if not state or bad:
        raise ValueError(f"{name}: not a kohya-layout SD LoRA, LoHa, LoKr or DoRA (expected keys lora_unet_*/lora_te_* "
                         f"ending in .lora_down.weight/.lora_up.weight, .hada_w1_a..., .lokr_w1...; found "
                         f"{(bad or list(state))[:3]})")
    _check_whole(state, name)
    if any(k.endswith(".hada_w1_a") for k in state):
        kind, ranks = "loha", [v.shape[0] for k, v in state.items() if k.endswith(".hada_w1_b")]
    elif any(".lokr_" in k for k in state):
        kind, ranks = "lokr", [v.shape[0] for k, v in state.items() if k.endswith((".lokr_w1_b", ".lokr_w2_b"))]
    else:
        kind = "dora" if any(k.endswith(f".{dora.SUFFIX}") for k in state) else "lora"
        ranks = [v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")]
    meta = dict(metadata or {})
    rank = int(ranks[0]) if ranks else int(meta.get("ss_network_dim", 0) or 0)
    alphas = [float(v) for k, v in state.items() if k.endswith(".alpha")]
    if "finetune_config" in meta:
        try:
            meta["finetune_config"] = json.loads(meta["finetune_config"])
        except ValueError:
            pass
    return LoRA(state, rank, alphas[0] if alphas else float(rank), name, meta, kind=kind)
