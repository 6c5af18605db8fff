"""DreamBooth: bind a rare identifier to a subject (LoRA or full fine-tune), with prior preservation.

With prior preservation the loss is ``instance loss + lambda * class loss``: each step also denoises a batch of
*class* pictures (what the base model draws for the class prompt, e.g. "a star"), so the class word keeps its
meaning while the identifier ("a sks star") learns the subject. Missing class pictures are generated from the
base model and cached on disk (``class_pictures``).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.dataset import Dataset, Example, prepare
from ..loop.distributed import SINGLE, Shard
from .lora import LoRAMethod, attach_lora
from ..loop.batches import encode_latent_dists
from ..loop.training import Callbacks, Method
from ..objectives.base import randn
from ..model.model import FTModel
from ..config.recipes import DreamBoothRecipe, TrainConfig
from ..runs.run_dir import RunDir
from .class_pictures import check_class_sets, gather_class_sets
from .subjects import Subject

#: DreamBooth's modes: a LoRA, or every UNet weight
MODES = ("lora", "full")

log = logging.getLogger(__name__)


def check_subjects(subjects: list[Subject], prior_preservation: bool, prior_loss_weight: float) -> None:
    if not subjects:
        raise ValueError("no subject: connect a dataset (or a chain of DreamBooth Subject nodes)")
    if prior_loss_weight < 0:
        raise ValueError(f"prior_loss_weight must not be negative, got {prior_loss_weight}")
    seen: dict[str, int] = {}
    for i, s in enumerate(subjects, 1):
        if not s.instance_prompt.strip():
            raise ValueError(f"subject {i}: instance_prompt is empty (e.g. 'a sks dog')")
        if prior_preservation and not s.class_prompt.strip():
            raise ValueError(f"subject {i}: class_prompt is empty but prior_preservation is on; give the class "
                             "(e.g. 'a dog'), or turn prior preservation off")
        if prior_preservation and s.instance_prompt.strip().lower() == s.class_prompt.strip().lower():
            raise ValueError(f"subject {i}: instance_prompt and class_prompt are the same ({s.class_prompt!r}), so "
                             "prior preservation would pull the subject back to the class on the very same prompt; "
                             f"add a rare identifier to the instance prompt, e.g. '{_with_identifier(s.class_prompt)}'")
        ident = s.identifier.lower()
        if ident in seen:
            raise ValueError(f"subjects {seen[ident]} and {i} use the same identifier {s.identifier!r}: each subject "
                             "needs its own rare word")
        seen[ident] = i


def _with_identifier(class_prompt: str) -> str:
    words = class_prompt.split()
    return " ".join(words[:-1] + ["sks"] + words[-1:]) if words else "a sks dog"


def instance_dataset(subjects: list[Subject]) -> Dataset:
    """All subjects' pictures in one dataset, each captioned with its subject's instance prompt."""
    first = subjects[0].dataset
    examples = [replace(e, caption=s.instance_prompt) for s in subjects for e in s.dataset.examples]  # masks kept
    return first.with_options(examples=examples, name="+".join(s.dataset.name for s in subjects),
                              caption_templates=())


# ------------------------------------------------------------------------------------------------- methods --
class FullMethod(Method):
    """Full fine-tune: every UNet weight (and the text encoder's, optionally; SDXL: both encoders') learns."""

    name = "full"

    def __init__(self, train_text_encoder: bool = False):
        self.trains_text_encoder = train_text_encoder
        self.model: FTModel | None = None

    def setup(self, model: FTModel) -> None:
        """What trains gets weights of its own (the rest of the model stays shared with the input)."""
        from ..model.deltas import materialize

        self.model = model
        for name, _ in self._modules():
            setattr(model, name, materialize(getattr(model, name)))

    def changed_parts(self) -> tuple[str, ...]:
        fam = self.model.family
        return (fam.denoiser_part, *fam.text_parts) if self.trains_text_encoder else (fam.denoiser_part,)

    def _modules(self):
        parts = self.model.parts()
        fam = self.model.family
        return [(n, m) for n, m in parts.items() if n == fam.denoiser_part or (self.trains_text_encoder and
                                                                                n in fam.text_parts)]

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        groups = []
        for name, m in self._modules():
            m.requires_grad_(True)
            groups.append({"params": list(m.parameters()), "lr": cfg.learning_rate, "name": name})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v for n, m in self._modules() for k, v in m.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, m in self._modules():
            m.load_state_dict({k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})

    def result(self, name: str, metadata: dict) -> None:
        """The weights stay in the model (nothing separate to hand over); they stop requiring gradients and go back
        to the model's precision (they trained in fp32)."""
        for _, m in self._modules():
            m.requires_grad_(False)
            m.to(self.model.dtype)
        return None


class DreamBoothMethod(Method):
    name = "dreambooth"

    def __init__(self, mode: str, inner: Method, prior_loss_weight: float = 1.0,
                 class_sets: list[tuple[list[np.ndarray], str]] | None = None, resolution: int = 0):
        if mode not in ("lora", "full"):
            raise ValueError(f"mode {mode!r} is not 'lora' or 'full'")
        self.mode, self.inner, self.lam = mode, inner, float(prior_loss_weight)
        self.class_sets = class_sets or []
        self.resolution = resolution  # the instance pictures' (0: the model's native size), as the class's are made
        self.class_latents = None  # (mean, std) of the class pictures' latents, from encode_extra
        self.trains_text_encoder = inner.trains_text_encoder

    def extra_sets(self) -> dict[str, list]:
        return {f"class-{i}": [(p, prompt) for p in pics] for i, (pics, prompt) in enumerate(self.class_sets)}

    def result(self, name: str, metadata: dict):
        return self.inner.result(name, metadata)

    def changed_parts(self) -> tuple[str, ...]:
        return self.inner.changed_parts()

    def setup(self, model: FTModel) -> None:
        self.inner.setup(model)
        self.model = model

    def encode_extra(self, model: FTModel) -> None:
        if not self.class_sets:
            return
        ds = Dataset([Example(p, prompt, f"class {i}") for pics, prompt in self.class_sets
                      for i, p in enumerate(pics)], name="class", resolution=self.resolution)
        mult = model.size_step
        prep = prepare(ds, model.native_size, mult)
        if len(prep.pixels) != 1:
            raise ValueError("class pictures of different sizes: give the class dataset one resolution")
        bucket = next(iter(prep.pixels))
        self.class_latents = encode_latent_dists(model, prep.pixels)[bucket]
        self.class_captions = prep.captions[bucket]
        self.class_framing = prep.framing[bucket]  # a given class picture's own size and crop

    def param_groups(self, cfg):
        return self.inner.param_groups(cfg)

    def trainable_state(self):
        return self.inner.trainable_state()

    def load_trainable_state(self, state):
        self.inner.load_trainable_state(state)

    def train_modules(self, model):
        return self.inner.train_modules(model)

    def after_step(self):
        self.inner.after_step()

    def loss(self, model, batch, objective):
        if self.class_latents is None or self.lam == 0:
            return super().loss(model, batch, objective)
        latents, context, g, shard = batch.latents, batch.context, batch.generator, batch.shard
        noisy, t, target = self.noised(latents, objective, batch)
        mean, std = self.class_latents
        idx = shard.take(torch.randint(len(mean), (latents.shape[0] * shard.world,), generator=g))
        eps = randn(mean[idx].shape, g, shard).to(mean.device)  # the class latents are on the device
        cl = model.latent_format.to_model(mean[idx] + std[idx] * eps).to(latents.device, latents.dtype)
        caps = [self.class_captions[i] for i in idx.tolist()]
        ctx = batch.encode_text(caps).to(context.dtype)
        cbatch = batch.but(latents=cl, captions=caps, context=ctx, masks=None, framing=self.class_framing[idx])
        cnoisy, ct, ctarget = self.noised(cl, objective, cbatch)
        if cl.shape[1:] == latents.shape[1:]:  # one denoiser call on instance + class pictures, as diffusers' does
            own = batch.framing
            framing = torch.cat([model.whole_framing(latents) if own is None else own.float().cpu(),
                                 cbatch.framing])
            both = self.predict(model, torch.cat([noisy, cnoisy]), torch.cat([t, ct]), torch.cat([context, ctx]),
                                batch.but(framing=framing))
            pred, cpred = both[:len(latents)], both[len(latents):]
        else:  # the instance bucket is not the class pictures' size
            pred = self.predict(model, noisy, t, context, batch)
            cpred = self.predict(model, cnoisy, ct, ctx, cbatch)
        return (self.loss_of(pred, target, t, objective, batch)
                + self.lam * self.loss_of(cpred, ctarget, ct, objective, cbatch))


def make_inner(mode: str, train_text_encoder: bool, rank: int, alpha: float, targets: str,
               kind: str = "lora") -> Method:
    if mode == "lora":
        return LoRAMethod(rank, alpha, targets, train_text_encoder, kind=kind)
    return FullMethod(train_text_encoder)


class PivotalMethod(Method):
    """Pivotal tuning: a LoRA and the identifier's embedding (Textual Inversion) learn together."""

    name = "lora+embedding"
    trains_text_encoder = True

    def __init__(self, lora: LoRAMethod, ti, embedding_lr: float):
        self.lora, self.ti, self.embedding_lr = lora, ti, embedding_lr

    def result(self, name: str, metadata: dict):
        """(the LoRA, the identifier's embedding)."""
        lora = self.lora.result(name, metadata)
        emb = self.ti.result(name, {"token": self.ti.token, "init_token": self.ti.init_token,
                                    "steps": metadata.get("steps"), "pivotal_lora": name})
        return lora, emb

    def setup(self, model: FTModel) -> None:
        self.ti.setup(model)  # adds the word first: the LoRA then wraps layers of the grown text encoder
        self.lora.setup(model)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        groups = self.lora.param_groups(cfg)
        embs = self.ti.param_groups(cfg)  # SDXL: one table per text encoder
        for emb in embs:
            emb["lr"] = self.embedding_lr or cfg.learning_rate
        return groups + embs

    def train_modules(self, model):
        return self.lora.train_modules(model)

    def changed_parts(self) -> tuple[str, ...]:
        return self.ti.changed_parts()

    def after_step(self) -> None:
        self.ti.after_step()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {**{f"lora.{k}": v for k, v in self.lora.trainable_state().items()},
                **{f"ti.{k}": v for k, v in self.ti.trainable_state().items()}}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lora.load_trainable_state({k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        self.ti.load_trainable_state({k[3:]: v for k, v in state.items() if k.startswith("ti.")})


# ------------------------------------------------------------------------------------------------ training --
def make_method(recipe: DreamBoothRecipe, model: FTModel, subjects: list[Subject]) -> Method:
    """The inner method of a DreamBooth run: a LoRA, a full fine-tune, or a LoRA with pivotal tuning."""
    from .textual_inversion import TextualInversionMethod

    inner = make_inner(recipe.mode, recipe.train_text_encoder, recipe.rank, recipe.alpha, recipe.target_modules,
                       recipe.adapter)
    if not recipe.pivotal_tuning:
        return inner
    if len(subjects) != 1:
        raise ValueError("pivotal_tuning trains one subject at a time; chain stages for more")
    words = subjects[0].class_prompt.split()
    ti = TextualInversionMethod(subjects[0].identifier, words[-1] if words else "object")
    ti.validate(model)
    return PivotalMethod(inner, ti, recipe.embedding_lr)


def train_dreambooth(recipe: DreamBoothRecipe, model: FTModel, subjects: list[Subject], run: RunDir,
                     callbacks: Callbacks | None = None, shard: Shard = SINGLE, *, class_cache: Path | None = None,
                     class_sets: list | None = None, instance: Dataset | None = None,
                     progress: Callable | None = None, scorer=None):
    """DreamBooth on one or several subjects: returns a TrainResult whose result is the LoRA (lora mode; None in full
    mode, whose weights are the model's) and ``extra["embedding"]`` the identifier's embedding (pivotal tuning).

    Class pictures come from ``class_sets`` when given (a repeated run), else from the subjects' class datasets and
    generation from the base model (cached under ``class_cache``)."""
    from ..runs.export import embedding_metadata, lora_metadata
    from ..loop.session import resolve_auto, result_metadata, run_method, save_in_run, settle

    model.family.check_supported(recipe)  # before class pictures are made
    check_subjects(subjects, recipe.prior_preservation, recipe.prior_loss_weight)
    recipe, chosen = resolve_auto(recipe, model, None, len(subjects))  # the inner method is built with what auto picks
    inner = make_method(recipe, model, subjects)
    if class_sets is None and recipe.prior_preservation:
        class_sets = gather_class_sets(recipe, model, subjects, class_cache or run.path.parent / "class_images",
                                       progress)
    class_sets = class_sets or []
    instance = instance or instance_dataset(subjects)
    method = DreamBoothMethod(recipe.mode, inner, recipe.prior_loss_weight, class_sets, instance.resolution)
    extra = {"subjects": [{"instance_prompt": s.instance_prompt, "class_prompt": s.class_prompt,
                           "identifier": s.identifier, "images": len(s.dataset.examples)} for s in subjects],
             "class_images": sum(len(p) for p, _ in class_sets), **chosen}
    if scorer is not None and class_sets:
        extra["class_check"] = check_class_sets(scorer, subjects, class_sets)
    res = run_method(method, recipe, model, instance, run, callbacks, shard,
                     extra_config=extra, scorer=scorer)
    if res.cancelled:
        return res.handed_over(None, None)
    tuned, lora, out = res.model, None, {}
    if recipe.mode == "lora":
        got = method.result(run.name, result_metadata(res, subjects[0].dataset.resolution or model.native_size))
        tuned = settle(tuned, model, method)
        lora, emb = got if isinstance(got, tuple) else (got, None)
        save_in_run(run, "lora", lora.state, lora_metadata(lora))
        tuned = attach_lora(tuned, lora, 1.0)  # the training's own copy
        tuned.history = tuned.history[:-1]
        if emb is not None:
            save_in_run(run, "embedding", emb.tensors(), embedding_metadata(emb))
            out["embedding"] = emb
    else:
        method.result(run.name, {})
        tuned = settle(tuned, model, method)
    tuned.history = tuned.history + [{"trained": f"dreambooth-{recipe.mode}", "run": run.name, "steps": res.step,
                                      "subjects": extra["subjects"]}]
    return res.handed_over(tuned, lora, out)
