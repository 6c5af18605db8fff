"""Textual Inversion: learn new token embeddings; every other weight stays bit-identical.

A new word (``<my-cat>``, or ``<my-cat>`` plus ``<my-cat>_1`` ... for several vectors) is added to a copy of the
tokenizer, the text encoder's embedding table grows by those rows, initialised from ``init_token``'s embedding,
and only they learn: after every optimizer step all other rows are restored from a saved copy. The result,
an :class:`Embedding`, saves as safetensors with one tensor ``emb_params`` (vectors x width), which ComfyUI's
``embedding:name`` syntax, A1111 and diffusers' ``load_textual_inversion`` read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributed import SINGLE, Shard
from .loop import Callbacks, Method
from .model import FTModel
from .recipes import TextualInversionRecipe, TrainConfig
from .runs import RunDir

OBJECT_TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "a photo of the {}", "the {}",
                    "a {} on a white background", "a picture of the {}", "a photo of one {}")
STYLE_TEMPLATES = ("a picture in the style of {}", "a painting in the style of {}", "a {} style picture",
                   "a photo in the style of {}", "art in the style of {}")
#: caption modes: the dataset's own captions (None), or templates with the token
CAPTION_MODES: dict[str, tuple[str, ...] | None] = {"dataset captions": None, "object templates": OBJECT_TEMPLATES,
                                                     "style templates": STYLE_TEMPLATES}


@dataclass
class Embedding:
    """``FT_EMBEDDING``: the vectors of a learned (or loaded) token."""

    token: str
    vectors: torch.Tensor  # (num_vectors, width)
    name: str = "embedding"
    metadata: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Embedding({self.token!r}, {tuple(self.vectors.shape)})"


def vector_tokens(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def check_new_token(model: FTModel, token: str) -> None:
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token {token!r} must be one word without spaces, e.g. <my-cat>")
    tok = model.tokenizer
    if token in tok.get_vocab() or token in model.token_vectors:
        raise ValueError(f"token {token!r} is already in the vocabulary; pick a new word such as <{token.strip('<>')}-1>")
    ids = tok(token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise ValueError(f"token {token!r} is already a word the model knows (one token in its vocabulary); "
                         f"pick a new word such as <{token}> so it does not change what '{token}' means")


def add_token(model: FTModel, token: str, vectors: torch.Tensor) -> list[int]:
    """Add ``token`` (and its extra vectors) to ``model`` (a copy) with the given embedding rows; returns ids."""
    check_new_token(model, token)
    words = vector_tokens(token, vectors.shape[0])
    te = model.text_encoder
    width = te.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise ValueError(f"embedding {token!r} has width {vectors.shape[1]}, this model's text encoder {width}: "
                         "it was made for another base model")
    added = model.tokenizer.add_tokens(words)
    if added != len(words):
        raise ValueError(f"could not add {words} to the tokenizer (some already exist)")
    ids = model.tokenizer.convert_tokens_to_ids(words)
    with torch.no_grad():
        te.resize_token_embeddings(len(model.tokenizer))
        emb = te.get_input_embeddings().weight
        emb[ids] = vectors.to(emb.device, emb.dtype)
    model.token_vectors[token] = words
    return ids


class TextualInversionMethod(Method):
    name = "textual_inversion"
    trains_text_encoder = True  # its input embeddings change: text is encoded every step

    def __init__(self, token: str, init_token: str, num_vectors: int = 1):
        if not 1 <= num_vectors <= 32:
            raise ValueError(f"num_vectors must be between 1 and 32, got {num_vectors}")
        self.token, self.init_token, self.num_vectors = token.strip(), init_token.strip(), num_vectors
        self.ids: list[int] = []
        self.model: FTModel | None = None

    @classmethod
    def from_recipe(cls, r: TextualInversionRecipe) -> "TextualInversionMethod":
        return cls(r.token, r.init_token, r.num_vectors)

    def validate(self, model: FTModel) -> int:
        """Check the token and init_token against ``model`` before any work; returns the init token's id."""
        check_new_token(model, self.token)
        init = model.tokenizer(self.init_token, add_special_tokens=False).input_ids
        if len(init) != 1:
            raise ValueError(f"init_token {self.init_token!r} is {len(init)} tokens; it must be a single word the "
                             "model knows (e.g. 'star', 'dog', 'painting')")
        return init[0]

    def setup(self, model: FTModel) -> None:
        init = [self.validate(model)]
        emb = model.text_encoder.get_input_embeddings().weight
        start = emb[init[0]].detach().clone().repeat(self.num_vectors, 1)
        self.ids = add_token(model, self.token, start)
        self.model = model
        self.frozen = model.text_encoder.get_input_embeddings().weight.detach().clone()
        self.keep = torch.ones(self.frozen.shape[0], dtype=torch.bool)
        self.keep[self.ids] = False
        dtype = model.dtype  # the table trains in fp32: what it gives the (half-precision) encoder is in its dtype
        model.text_encoder.get_input_embeddings().register_forward_hook(lambda m, i, out: out.to(dtype))

    def train_modules(self, model: FTModel) -> list[torch.nn.Module]:
        return []  # nothing switches to train mode: only embedding rows learn

    def changed_parts(self) -> tuple[str, ...]:
        return ("text_encoder",)  # its embedding table grew by the new word

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        w = self.model.text_encoder.get_input_embeddings().weight
        w.requires_grad_(True)
        return [{"params": [w], "lr": cfg.learning_rate, "weight_decay": 0.0, "name": "embeddings"}]

    def after_step(self) -> None:
        w = self.model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            w[self.keep] = self.frozen[self.keep].to(w.dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        w = self.model.text_encoder.get_input_embeddings().weight
        return {"emb_params": w[self.ids].detach().float().cpu()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        w = self.model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            w[self.ids] = state["emb_params"].to(w.device, w.dtype)

    def finish(self) -> None:
        """Training is over: the embedding table stops requiring gradients and goes back to the model's precision
        (it trained in fp32; the learned vectors are exported in fp32)."""
        w = self.model.text_encoder.get_input_embeddings().weight
        w.requires_grad_(False)
        w.data = w.data.to(self.model.dtype)

    def export(self, name: str, metadata: dict | None = None) -> Embedding:
        return Embedding(self.token, self.trainable_state()["emb_params"], name, dict(metadata or {}))

    def result(self, name: str, metadata: dict) -> Embedding:
        """The learned word; the embedding table stops requiring gradients (the word stays in the model)."""
        emb = self.export(name, metadata)  # the fp32 vectors, before the table goes back to the model's precision
        self.finish()
        return emb


def captioned_for(recipe: TextualInversionRecipe, dataset):
    """The dataset with the recipe's caption mode: its own captions must hold the token; templates replace them."""
    token = recipe.token.strip()
    templates = CAPTION_MODES[recipe.caption_mode]
    if templates is None:
        if not any(token in e.caption for e in dataset.examples):
            raise ValueError(f"caption_mode 'dataset captions': no caption of the dataset contains the token "
                             f"{token!r}. Put it in the captions (e.g. caption 'a photo of {{token}}' with "
                             f"token {token!r}), or choose object or style templates")
        return dataset
    return dataset.with_options(caption_templates=templates, template_token=token)


def train_textual_inversion(recipe: TextualInversionRecipe, model: FTModel, dataset, run: RunDir,
                            callbacks: Callbacks | None = None, shard: Shard = SINGLE, *, scorer=None):
    """Learn a new word: returns a Trained with the model that knows it and the Embedding (also kept in the run
    folder as ``embedding.safetensors``)."""
    from .export import embedding_metadata
    from .session import Trained, run_method, save_in_run, settle

    from .families import check_supported

    check_supported(model, recipe)
    method = TextualInversionMethod.from_recipe(recipe)
    method.validate(model)
    dataset = captioned_for(recipe, dataset)
    res = run_method(method, recipe, model, dataset, run, callbacks, shard, scorer=scorer)
    if res.cancelled:
        return Trained(None, None, res)
    emb = method.result(run.name, {"token": method.token, "init_token": method.init_token, "steps": res.step,
                                   "finetune_config": res.config})
    save_in_run(run, "embedding", {"emb_params": emb.vectors}, embedding_metadata(emb))
    tuned = settle(res.model, model, method)
    tuned.history = tuned.history + [{"trained": "textual_inversion", "run": run.name, "token": method.token,
                                      "steps": res.step}]
    return Trained(tuned, emb, res)


def apply_embedding(model: FTModel, emb: Embedding, token: str | None = None) -> FTModel:
    """``model`` with ``emb`` added under ``token`` (default: its own), as a new model sharing ``model``'s weights
    but the grown embedding table (``model`` is not changed)."""
    if model.text_encoder_2 is not None:
        raise ValueError(f"embedding {emb.name!r}: applying embeddings to an SDXL-architecture model ({model.name}) "
                         "is not supported yet (an SDXL embedding holds a vector for each of its two text encoders, "
                         "clip_l and clip_g)")
    model = model.share()
    add_token(model, (token or emb.token).strip(), emb.vectors.float())
    model.history = model.history + [{"applied_embedding": emb.name, "token": token or emb.token}]
    return model


def embedding_from_state(state: dict[str, torch.Tensor], name: str, metadata: dict | None = None) -> Embedding:
    """Read the common embedding files: ``emb_params`` (kohya/A1111), ``clip_l`` (SD1 in SDXL-style files), or a
    file whose only tensor is the embedding (diffusers ``{token: tensor}``)."""
    meta = dict(metadata or {})
    for key in ("emb_params", "clip_l"):
        if key in state:
            vec = state[key]
            break
    else:
        tensors = [v for v in state.values() if v.ndim in (1, 2)]
        if len(tensors) != 1:
            raise ValueError(f"{name}: not an embedding file (expected a tensor 'emb_params', or exactly one "
                             f"tensor; found {list(state)[:4]})")
        vec = tensors[0]
    vec = vec.float()
    if vec.ndim == 1:
        vec = vec[None]
    token = meta.get("token") or (next(iter(state)) if len(state) == 1 and next(iter(state)).startswith("<") else name)
    return Embedding(token, vec, name, meta)
