"""FT_MODEL: a text-to-image model the pack can sample and train, with the family it belongs to."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..families.base import Family, LatentFormat
from ..families.registry import FAMILIES

#: the most pixels one VAE call encodes or decodes: one SDXL picture. The VAE's activations grow with every pixel
#: of the call (an fp32 SDXL VAE holds 2.5 GB encoding one 1024 px picture, 3.75 GB decoding it), so 16 pictures at
#: 1024 px in one call would need more memory than the whole training step.
VAE_PIXELS = 1024 * 1024


def vae_chunk(height: int, width: int, most: int = 16) -> int:
    """How many pictures of ``height`` x ``width`` one VAE call takes: as many as :data:`VAE_PIXELS` holds, from 1 to
    ``most`` (16 pictures up to 256 px, 4 at 512 px, 1 at 768 px and above)."""
    return max(1, min(most, VAE_PIXELS // (height * width)))


def pool_at_end_of_text(text_encoder, tokenizer) -> None:
    """transformers pools a CLIP text encoder whose config says ``eos_token_id`` 2 (SD's and SDXL's, as published) at
    the highest token id of the prompt, so a Textual Inversion token (ids past the vocabulary) is pooled instead of
    the end of the text. ComfyUI and A1111 pool at the end of the text: point the encoder at the tokenizer's own
    end-of-text id (the runtime attribute only; the config, and the files written from it, stay as they were)."""
    inner = getattr(text_encoder, "text_model", None)
    end = getattr(tokenizer, "eos_token_id", None)
    if inner is not None and getattr(inner, "eos_token_id", None) == 2 and end not in (None, 2):
        inner.eos_token_id = end


@dataclass(eq=False)
class FTModel:
    """A model's parts and its :class:`~..families.base.Family`, which drives them: the loop and the methods speak of
    the :attr:`denoiser`, :meth:`encode_prompts`, :meth:`denoise`, :attr:`latent_format` and :meth:`objective`, and
    the family answers (SDXL's second text encoder, pooled embedding and time ids live in its family class).
    ``family`` may be given as a family's name.

    Nodes never mutate an FTModel they receive (ComfyUI caches node outputs): trainers and adapters work on a
    :meth:`share` of it, whose modules are new but whose frozen weights are the same tensors (see :mod:`.deltas`).
    """

    family: Family
    name: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    history: list[dict] = field(default_factory=list)
    #: multi-vector tokens added by Textual Inversion: "<tok>" -> ["<tok>", "<tok>_1", ...]
    token_vectors: dict[str, list[str]] = field(default_factory=dict)
    #: how to load it again: "toy (built-in)", "diffusers/<folder>" or "checkpoints/<file>" ("" = made in memory)
    source: str = ""
    #: the weights wait in CPU memory and visit ``device`` only while they run (as ComfyUI keeps its models), so a
    #: GPU holds what is in use: sampling places the whole model (:meth:`placed`), training keeps the UNet there and
    #: lets the VAE and text encoder go once their outputs are cached
    offload: bool = False
    #: how the prediction type was chosen ("detected from the weights", "set by the prediction input", ...)
    prediction_source: str = ""
    #: SDXL: the second text encoder (CLIPTextModelWithProjection) and its tokenizer; None for other families
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    #: the guidance this model samples at under auto (cfg 0) where it is not its family's: Z-Image Turbo's 1 (a
    #: distilled model draws without guidance); 0 = the family's (:attr:`.Family.sample_cfg`)
    sample_cfg: float = 0.0

    def __post_init__(self):
        if isinstance(self.family, str):
            self.family = FAMILIES[self.family]
        pool_at_end_of_text(self.text_encoder, self.tokenizer)  # SDXL's text_embeds: the second encoder's pooling
        pool_at_end_of_text(self.text_encoder_2, self.tokenizer_2)

    def parts(self) -> dict[str, Any]:
        """Every module of the model by name, in the family's order: the denoiser, the VAE, the text encoders."""
        return {name: m for name in self.family.parts if (m := self.part(name)) is not None}

    def part(self, name: str):
        """The module of part ``name`` (the denoiser under its family's name: "unet" or "transformer")."""
        return self.unet if name == self.family.denoiser_part else getattr(self, name)

    @property
    def denoiser(self) -> torch.nn.Module:
        """What predicts the noise (a UNet, or a transformer); the field ``unet`` holds either."""
        return self.unet

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser of a transformer family (Z-Image's), by the name its files and pipelines give it."""
        return self.unet

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:
        self.unet = module

    @property
    def text_parts(self) -> tuple[str, ...]:
        return self.family.text_parts

    @property
    def text_encoders(self) -> list[Any]:
        return [m for m in (getattr(self, n) for n in self.family.text_parts) if m is not None]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, n) for n in self.family.tokenizer_parts]

    @property
    def conditioned_on_time_ids(self) -> bool:
        """SDXL's micro-conditioning: pooled text embedding + (original size, crop, target size) time ids."""
        cfg = self.unet.config
        return (cfg.get("addition_embed_type") if isinstance(cfg, dict) else
                getattr(cfg, "addition_embed_type", None)) == "text_time"

    def fingerprint(self) -> str:
        """A hash of the weights' shapes and of the first and last values of every UNet, text-encoder and VAE tensor:
        cheap on a multi-GB model, and it tells a different or changed model apart."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(self.family.name.encode())
        with torch.no_grad():
            from .deltas import delta_buffers

            for part in [self.unet, self.text_encoder, self.vae, *self.text_encoders[1:]]:
                for name, p in [*part.named_parameters(), *delta_buffers(part)]:
                    flat = p.detach().reshape(-1)
                    h.update(f"{name}{tuple(p.shape)}".encode())
                    for piece in (flat[:64], flat[-64:]):
                        h.update(np.ascontiguousarray(piece.float().cpu().numpy()).tobytes())
        return h.hexdigest()[:20]

    def identity(self) -> dict:
        """What config.json records about the base model: enough to load it again and to check it is the same."""
        return {"family": self.family.name, "name": self.name, "source": self.source, "fingerprint": self.fingerprint(),
                "dtype": str(self.dtype).removeprefix("torch."), "history": list(self.history),
                "token_vectors": {k: list(v) for k, v in self.token_vectors.items()},
                "prediction_type": self.prediction_type}

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon" (the noise) or "v_prediction" (the velocity), or "flow" (a
        flow-matching model's noise - x0); it sets the training target and the sampler."""
        return self.family.prediction_type(self)

    def guidance(self, cfg: float) -> float:
        """``cfg``, or where it is 0 (auto) this model's own sampling guidance: its :attr:`sample_cfg` if it has one,
        else its family's (:meth:`.Family.guidance`)."""
        return float(cfg) if cfg > 0 else (self.sample_cfg or self.family.guidance(0))

    def describe(self) -> str:
        """One line for the loader node: family, native size and prediction type (and how it was chosen)."""
        how = f" ({self.prediction_source})" if self.prediction_source else ""
        return f"{self.name}: {self.family.label}, {self.native_size} px, {self.prediction_type}{how}"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_step(self) -> int:
        """What every picture side must be a multiple of: the VAE's factor times the UNet's downsamplings."""
        return self.family.size_step(self)

    @property
    def native_size(self) -> int:
        return self.family.native_pixels(self)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def expand_tokens(self, prompt: str) -> str:
        """Spell a multi-vector Textual Inversion token as all its vectors ("<tok>" -> "<tok> <tok>_1 ...")."""
        for tok, parts in self.token_vectors.items():
            if len(parts) > 1 and tok in prompt:
                prompt = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(tok)}(?![A-Za-z0-9_])", " ".join(parts), prompt)
        return prompt

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        prompts = [self.expand_tokens(p) for p in prompts]
        tok = tokenizer or self.tokenizer
        return tok(prompts, padding="max_length", max_length=int(tok.model_max_length), truncation=True,
                   return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, tokens, width) as the denoiser expects them, on ``device`` (computed where the text
        encoders are: in CPU memory when they were offloaded); the family says how."""
        return self.family.encode_prompts(self, prompts)

    def conditioning(self, x: torch.Tensor, context: torch.Tensor, framing: torch.Tensor | None = None) -> dict:
        """The keyword arguments a denoiser (or ControlNet) call takes for :meth:`encode_prompts`' ``context``, and
        for ``framing`` (B, 6: original height, width, crop top, left, target height, width; default: whole pictures
        the size of ``x``) where the family is conditioned on it."""
        return self.family.conditioning(self, x, context, framing)

    def whole_framing(self, x: torch.Tensor) -> torch.Tensor:
        """The framing of latents ``x`` showing whole, uncropped pictures of their own size."""
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(len(x), 6)

    def denoise(self, x: torch.Tensor, t, context: torch.Tensor | None = None, framing: torch.Tensor | None = None,
                *, conditioning: dict | None = None, **extra) -> torch.Tensor:
        """The denoiser's prediction for latents ``x`` at timesteps ``t``, conditioned on ``context`` (or on a
        :meth:`conditioning` already made); ``extra`` goes to the denoiser (a ControlNet's residuals)."""
        if conditioning is None:
            conditioning = self.conditioning(x, context, framing)
        return self.family.denoise(self, x, t, conditioning, **extra)

    @property
    def latent_format(self) -> LatentFormat:
        """How VAE latents become the denoiser's (scale and shift)."""
        return self.family.latent_format(self)

    def objective(self):
        """The training objective of this model (its family's, with its scheduler config)."""
        return self.family.objective(self)

    def to(self, device, dtype=None, offload: bool = False) -> "FTModel":
        """Every part on ``device`` (in ``dtype``), in place; offloaded only when asked. ``offload`` (a GPU
        ``device``): each part is cast in CPU memory and stays there, visiting the GPU while it runs (:meth:`placed`),
        so a loader never puts the whole model on the GPU to take it off again."""
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"
        if dtype is not None:
            self.dtype = dtype
        home = torch.device("cpu") if self.offload else self.device
        for name, m in self.parts().items():
            want = self.part_dtype(name)
            if m.device != home or m.dtype != want:
                m.to(home, want)
        return self

    def part_dtype(self, name: str) -> torch.dtype:
        """The precision of part ``name``: the model's, except a VAE that overflows in fp16 (SDXL's: the family says
        so, as its config's force_upcast tells diffusers' SDXL pipeline), which stays in fp32 beside an fp16 model
        (84 M weights)."""
        if name == "vae" and self.dtype == torch.float16 and self.family.vae_upcast:
            return torch.float32
        return self.dtype

    @contextlib.contextmanager
    def placed(self, parts: tuple[str, ...] | None = None):
        """The model with its parts on ``device`` (those named in ``parts``, or every one): itself when it is not
        offloaded, else a share whose parts are copied to the device for the block and dropped after it (nothing
        stays on the GPU)."""
        if not self.offload:
            yield self
            return
        here = self.share()
        here.offload = False
        for name, m in here.parts().items():
            if parts is None or name in parts:
                m.to(self.device)
        try:
            yield here
        finally:
            del here

    def share(self, own: tuple[str, ...] = ()) -> "FTModel":
        """A model to change without changing this one: new modules over the *same* weight tensors (no memory for
        frozen weights), except the parts named in ``own`` ("unet", "vae", "text_encoder"), which get plain
        copies of their own (what a full fine-tune trains). The tokenizers and the bookkeeping are copied."""
        import copy

        from .deltas import materialize, share

        parts = {n: (materialize if n in own else share)(m) for n, m in self.parts().items()}
        return FTModel(self.family, self.name, parts[self.family.denoiser_part], parts["vae"], parts["text_encoder"],
                       copy.deepcopy(self.tokenizer), dict(self.scheduler_config), self.device, self.dtype,
                       list(self.history), {k: list(v) for k, v in self.token_vectors.items()}, self.source,
                       self.offload, self.prediction_source, parts.get("text_encoder_2"),
                       copy.deepcopy(self.tokenizer_2), self.sample_cfg)

    def clone(self) -> "FTModel":
        """A copy with weights of its own (live adapters merged in): ~4 GB for SD1.5 in fp32. Prefer :meth:`share`."""
        return self.share(own=tuple(self.parts()))

    def to_pipeline(self):
        """A diffusers pipeline of the model's family over the same modules (no copy)."""
        return self.family.pipeline(self)

    def __repr__(self) -> str:  # shown in ComfyUI's error messages and logs
        return f"FTModel({self.family.name}, {self.name!r}, {self.device}, {str(self.dtype).removeprefix('torch.')})"
