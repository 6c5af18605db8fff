"""FT_MODEL: a text-to-image model the pack can sample and train, with the family it belongs to."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class FTModel:
    """The components of a Stable-Diffusion-like model plus what the pack needs to know about them.

    Nodes never mutate an FTModel they receive (ComfyUI caches node outputs): trainers and adapters work on a
    copy made with :meth:`clone`.
    """

    family: str
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

    def fingerprint(self) -> str:
        """A hash of the weights' shapes and of the first and last values of every UNet, text-encoder and VAE tensor:
        cheap on a multi-GB model, and it tells a different or changed model apart."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(self.family.encode())
        with torch.no_grad():
            for part in (self.unet, self.text_encoder, self.vae):
                for name, p in part.named_parameters():
                    flat = p.detach().reshape(-1)
                    h.update(f"{name}{tuple(p.shape)}".encode())
                    for piece in (flat[:64], flat[-64:]):
                        h.update(np.ascontiguousarray(piece.float().cpu().numpy()).tobytes())
        return h.hexdigest()[:20]

    def identity(self) -> dict:
        """What config.json records about the base model: enough to load it again and to check it is the same."""
        return {"family": self.family, "name": self.name, "source": self.source, "fingerprint": self.fingerprint(),
                "dtype": str(self.dtype).removeprefix("torch."), "history": list(self.history),
                "token_vectors": {k: list(v) for k, v in self.token_vectors.items()}}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

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

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        prompts = [self.expand_tokens(p) for p in prompts]
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, tokens, width) as the UNet's cross-attention expects them."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0]

    def to(self, device, dtype=None) -> "FTModel":
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for m in (self.unet, self.vae, self.text_encoder):
            if m.device != self.device or m.dtype != self.dtype:
                m.to(self.device, self.dtype)
        return self

    def clone(self) -> "FTModel":
        """A deep copy of the weights (cheap for the toy, ~4 GB for SD1.5 in fp32: use sparingly)."""
        import copy

        return FTModel(self.family, self.name, copy.deepcopy(self.unet), copy.deepcopy(self.vae),
                       copy.deepcopy(self.text_encoder), copy.deepcopy(self.tokenizer), dict(self.scheduler_config),
                       self.device, self.dtype, list(self.history),
                       {k: list(v) for k, v in self.token_vectors.items()}, self.source)

    def to_pipeline(self):
        """A diffusers StableDiffusionPipeline over the same modules (no copy)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def __repr__(self) -> str:  # shown in ComfyUI's error messages and logs
        return f"FTModel({self.family}, {self.name!r}, {self.device}, {str(self.dtype).removeprefix('torch.')})"
