"""Textual Inversion: learn new token embeddings; every other weight stays bit-identical.

A new word (``<my-cat>``, or ``<my-cat>`` plus ``<my-cat>_1`` ... for several vectors) is added to a copy of the
tokenizer, the text encoder's embedding table grows by those rows, initialised from ``init_token``'s embedding,
and only they learn: after every optimizer step all other rows are restored from a saved copy. The result,
an :class:`Embedding`, saves as safetensors with one tensor ``emb_params`` (vectors x width), which ComfyUI's
``embedding:name`` syntax, A1111 and diffusers' ``load_textual_inversion`` read. An SDXL-architecture model learns
the word in both text encoders at once, and its embedding saves as SDXL's ``clip_l`` + ``clip_g`` pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..loop.distributed import SINGLE, Shard
from ..loop.training import Callbacks, Method
from ..model.model import FTModel
from ..config.recipes import TextualInversionRecipe, TrainConfig
from ..runs.run_dir import RunDir

OBJECT_TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "a photo of the {}", "the {}",
                    "a {} on a white background", "a picture of the {}", "a photo of one {}")
STYLE_TEMPLATES = ("a picture in the style of {}", "a painting in the style of {}", "a {} style picture",
                   "a photo in the style of {}", "art in the style of {}")
#: caption modes: the dataset's own captions (None), or templates with the token
CAPTION_MODES: dict[str, tuple[str, ...] | None] = {"dataset captions": None, "object templates": OBJECT_TEMPLATES,
                                                     "style templates": STYLE_TEMPLATES}


@dataclass
class Embedding:
    """``FT_EMBEDDING``: the vectors of a learned (or loaded) token (SDXL: one set per text encoder)."""

    token: str
    vectors: torch.Tensor  # (num_vectors, width): the (first) text encoder's
    name: str = "embedding"
    metadata: dict = field(default_factory=dict)
    vectors_2: torch.Tensor | None = None  #: SDXL: the second text encoder's (num_vectors, width_2)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What its file holds: ``emb_params``, or SDXL's ``clip_l`` and ``clip_g``."""
        if self.vectors_2 is None:
            return {"emb_params": self.vectors}
        return {"clip_l": self.vectors, "clip_g": self.vectors_2}

    def __repr__(self) -> str:
        second = "" if self.vectors_2 is None else f" + {tuple(self.vectors_2.shape)}"
        return f"Embedding({self.token!r}, {tuple(self.vectors.shape)}{second})"


def vector_tokens(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def encoders(model: FTModel) -> list[tuple[torch.nn.Module, object]]:
    """(text encoder, its tokenizer) pairs, in the family's order: one, or SDXL's two."""
    return list(zip(model.text_encoders, model.tokenizers))


def check_new_token(model: FTModel, token: str) -> None:
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token {token!r} must be one word without spaces, e.g. <my-cat>")
    for _, tok in encoders(model):
        if token in tok.get_vocab() or token in model.token_vectors:
            raise ValueError(f"token {token!r} is already in the vocabulary; pick a new word such as "
                             f"<{token.strip('<>')}-1>")
        ids = tok(token, add_special_tokens=False).input_ids
        if len(ids) == 1:
            raise ValueError(f"token {token!r} is already a word the model knows (one token in its vocabulary); "
                             f"pick a new word such as <{token}> so it does not change what '{token}' means")


def add_token(model: FTModel, token: str, vectors: torch.Tensor,
              vectors_2: torch.Tensor | None = None) -> list[list[int]]:
    """Add ``token`` (and its extra vectors) to ``model`` (a copy) with the given embedding rows (SDXL: ``vectors``
    for the first text encoder, ``vectors_2`` for the second); returns the new ids, per text encoder."""
    check_new_token(model, token)
    words = vector_tokens(token, vectors.shape[0])
    pairs = encoders(model)
    if len(pairs) == 2 and vectors_2 is None:
        raise ValueError(f"embedding {token!r} has vectors for one text encoder (an SD 1.x/2.x embedding); this "
                         f"SDXL-architecture model needs one for each of its two (an SDXL file's clip_l and clip_g)")
    rows = [vectors, vectors_2][:len(pairs)]
    for (te, _), vec, which in zip(pairs, rows, ("", " second")):
        width = te.get_input_embeddings().weight.shape[1]
        if vec.shape[1] != width:
            raise ValueError(f"embedding {token!r} has width {vec.shape[1]}, this model's{which} text encoder "
                             f"{width}: it was made for another base model")
    out = []
    for (te, tok), vec in zip(pairs, rows):
        added = tok.add_tokens(words)
        if added != len(words):
            raise ValueError(f"could not add {words} to the tokenizer (some already exist)")
        ids = tok.convert_tokens_to_ids(words)
        with torch.no_grad():
            te.resize_token_embeddings(len(tok))
            emb = te.get_input_embeddings().weight
            emb[ids] = vec.to(emb.device, emb.dtype)
        out.append(ids)
    model.token_vectors[token] = words
    return out


class TextualInversionMethod(Method):
    name = "textual_inversion"
    trains_text_encoder = True  # its input embeddings change: text is encoded every step

    def __init__(self, token: str, init_token: str, num_vectors: int = 1):
        if not 1 <= num_vectors <= 32:
            raise ValueError(f"num_vectors must be between 1 and 32, got {num_vectors}")
        self.token, self.init_token, self.num_vectors = token.strip(), init_token.strip(), num_vectors
        #: per text encoder: (the encoder, the new ids, the table's frozen copy, the rows to restore)
        self.tables: list[tuple[torch.nn.Module, list[int], torch.Tensor, torch.Tensor]] = []
        self.model: FTModel | None = None

    @classmethod
    def from_recipe(cls, r: TextualInversionRecipe) -> "TextualInversionMethod":
        return cls(r.token, r.init_token, r.num_vectors)

    def validate(self, model: FTModel) -> list[list[int]]:
        """Check the token and init_token against ``model`` before any work; returns init_token's ids in each
        tokenizer (a word each where the words are known ones)."""
        check_new_token(model, self.token)
        out = []
        for _, tok in encoders(model):
            init = tok(self.init_token, add_special_tokens=False).input_ids
            if not init:
                raise ValueError("init_token is empty: give a known word the new one starts from (e.g. 'star', "
                                 "'dog', 'painting'), or several, one per vector ('blue star' with num_vectors 2)")
            if len(init) > self.num_vectors:
                raise ValueError(f"init_token {self.init_token!r} is {len(init)} tokens but num_vectors is "
                                 f"{self.num_vectors}: each vector starts from one token, so raise num_vectors to "
                                 f"{len(init)}, or give fewer words (one known word is one token)")
            out.append(init)
        return out

    def setup(self, model: FTModel) -> None:
        init = self.validate(model)
        # vector k starts from init_token's token k, cycling: 'star' fills every vector, 'blue star' alternates
        starts = [te.get_input_embeddings().weight[[ids[k % len(ids)] for k in range(self.num_vectors)]]
                  .detach().clone() for (te, _), ids in zip(encoders(model), init)]
        ids = add_token(model, self.token, *starts)
        self.model = model
        dtype = model.dtype  # the table trains in fp32: what it gives the (half-precision) encoder is in its dtype
        self.tables = []
        for (te, _), new in zip(encoders(model), ids):
            frozen = te.get_input_embeddings().weight.detach().clone()
            keep = torch.ones(frozen.shape[0], dtype=torch.bool)
            keep[new] = False
            self.tables.append((te, new, frozen, keep))
            te.get_input_embeddings().register_forward_hook(lambda m, i, out: out.to(dtype))

    @property
    def ids(self) -> list[int]:
        return self.tables[0][1] if self.tables else []

    def train_modules(self, model: FTModel) -> list[torch.nn.Module]:
        return []  # nothing switches to train mode: only embedding rows learn

    def changed_parts(self) -> tuple[str, ...]:
        return self.model.text_parts  # their embedding tables grew (SDXL: both)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        groups = []
        for k, (te, _, _, _) in enumerate(self.tables):
            w = te.get_input_embeddings().weight
            w.requires_grad_(True)
            groups.append({"params": [w], "lr": cfg.learning_rate, "weight_decay": 0.0,
                           "name": "embeddings" + ("_2" if k else "")})
        return groups

    def after_step(self) -> None:
        for te, _, frozen, keep in self.tables:
            w = te.get_input_embeddings().weight
            with torch.no_grad():
                w[keep] = frozen[keep].to(w.dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"emb_params" + ("_2" if k else ""): te.get_input_embeddings().weight[new].detach().float().cpu()
                for k, (te, new, _, _) in enumerate(self.tables)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, (te, new, _, _) in enumerate(self.tables):
            w = te.get_input_embeddings().weight
            with torch.no_grad():
                w[new] = state["emb_params" + ("_2" if k else "")].to(w.device, w.dtype)

    def finish(self) -> None:
        """Training is over: the embedding tables stop requiring gradients and go back to the model's precision
        (they trained in fp32; the learned vectors are exported in fp32)."""
        for te, _, _, _ in self.tables:
            w = te.get_input_embeddings().weight
            w.requires_grad_(False)
            w.data = w.data.to(self.model.dtype)

    def export(self, name: str, metadata: dict | None = None) -> Embedding:
        state = self.trainable_state()
        return Embedding(self.token, state["emb_params"], name, dict(metadata or {}), state.get("emb_params_2"))

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
    """Learn a new word: returns a TrainResult with the model that knows it and the Embedding (also kept in the run
    folder as ``embedding.safetensors``)."""
    from ..runs.export import embedding_metadata
    from ..loop.session import run_method, save_in_run, settle

    model.family.check_supported(recipe)
    method = TextualInversionMethod.from_recipe(recipe)
    method.validate(model)
    dataset = captioned_for(recipe, dataset)
    res = run_method(method, recipe, model, dataset, run, callbacks, shard, scorer=scorer)
    if res.cancelled:
        return res.handed_over(None, None)
    emb = method.result(run.name, {"token": method.token, "init_token": method.init_token, "steps": res.step,
                                   "finetune_config": res.config})
    save_in_run(run, "embedding", emb.tensors(), embedding_metadata(emb))
    tuned = settle(res.model, model, method)
    tuned.history = tuned.history + [{"trained": "textual_inversion", "run": run.name, "token": method.token,
                                      "steps": res.step}]
    return res.handed_over(tuned, emb)


def apply_embedding(model: FTModel, emb: Embedding, token: str | None = None) -> FTModel:
    """``model`` with ``emb`` added under ``token`` (default: its own), as a new model sharing ``model``'s weights
    but the grown embedding table (``model`` is not changed)."""
    model = model.share()
    add_token(model, (token or emb.token).strip(), emb.vectors.float(),
              None if emb.vectors_2 is None else emb.vectors_2.float())
    model.history = model.history + [{"applied_embedding": emb.name, "token": token or emb.token}]
    return model


def embedding_from_state(state: dict[str, torch.Tensor], name: str, metadata: dict | None = None) -> Embedding:
    """Read the common embedding files: ``emb_params`` (kohya/A1111), SDXL's ``clip_l`` + ``clip_g`` (``clip_l``
    alone serves an SD 1.x model, as in ComfyUI), or a file whose only tensor is the embedding (diffusers
    ``{token: tensor}``)."""
    meta = dict(metadata or {})
    second = state["clip_g"].float() if "clip_l" in state and "clip_g" in state else None
    if second is not None and second.ndim == 1:
        second = second[None]
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
    return Embedding(token, vec, name, meta, second)
