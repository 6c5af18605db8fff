"""From pictures to what the UNet trains on: epochs of shuffled same-bucket batches (:class:`Batches`, whose position
is checkpointed) and their latents and text embeddings (:class:`Encoder`, with caches where the encoders are frozen).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..config.recipes import TrainConfig
from ..objectives.base import randn
from ..data.augment import augment_batch
from ..data.dataset import Dataset, Prepared, process_caption
from .distributed import SINGLE, Shard
from ..model.model import FTModel, vae_chunk


class Batches:
    """Epochs of shuffled batches, each from one size bucket; its position is part of the checkpoint."""

    def __init__(self, prepared: Prepared, batch_size: int, g: torch.Generator):
        self.p, self.bs, self.g = prepared, batch_size, g
        self.epoch: list[list[int]] = []  # batches of indices into prepared.index
        self.pos = 0

    def _new_epoch(self) -> None:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, (b, _) in enumerate(self.p.index):
            by_bucket.setdefault(b, []).append(i)
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b]
            perm = torch.randperm(len(idx), generator=self.g).tolist()
            idx = [idx[j] for j in perm]
            # a bucket smaller than the batch is topped up by repeating its own pictures
            while len(idx) % self.bs:
                idx.append(idx[len(idx) % len(perm)])
            batches += [idx[k:k + self.bs] for k in range(0, len(idx), self.bs)]
        order = torch.randperm(len(batches), generator=self.g).tolist()
        self.epoch, self.pos = [batches[k] for k in order], 0

    def next(self) -> list[tuple[tuple[int, int], int]]:
        if self.pos >= len(self.epoch):
            self._new_epoch()
        batch = self.epoch[self.pos]
        self.pos += 1
        return [self.p.index[i] for i in batch]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, st: dict) -> None:
        self.epoch, self.pos = [list(b) for b in st["epoch"]], int(st["pos"])


@dataclass
class Batch:
    """One micro-batch as a method's loss sees it: this process's rows of latents and what came with them (its
    captions and their embeddings, pictures, paired conditions, masks, framing), and the run's generator and config,
    through which every random draw and every option goes."""

    latents: torch.Tensor
    captions: list[str]
    generator: torch.Generator
    cfg: TrainConfig
    shard: Shard = SINGLE
    #: embeds more captions the way the loop does (cached while the text encoders are frozen)
    encode_text: Callable[[list[str]], torch.Tensor] | None = None
    items: list = field(default_factory=list)
    #: the captions' embeddings, made under the run's autocast just before the loss
    context: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    conditions: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    #: each picture's original size, crop and target size (B, 6), for the families conditioned on it
    framing: torch.Tensor | None = None

    def but(self, **changes) -> "Batch":
        """The same batch with ``changes`` (DreamBooth's class pictures: other latents, captions, no masks)."""
        return replace(self, **changes)


class Encoder:
    """Turns drawn batches into latents and text embeddings: latents cached once when nothing augments them, text
    embeddings cached when the text encoder is frozen. Every draw goes through the run's generator, for the global
    batch, so each rank of a distributed run gets its own rows of what one process would draw."""

    def __init__(self, model: FTModel, dataset: Dataset, method, prepared: Prepared, g: torch.Generator,
                 shard: Shard):
        self.model, self.dataset, self.method, self.p, self.g, self.shard = model, dataset, method, prepared, g, shard
        self.latent_format = model.latent_format
        self.cache_latents = dataset.augment is None
        self.latents = encode_latent_dists(model, prepared.pixels) if self.cache_latents else {}
        self.text: dict[str, torch.Tensor] = {}

    def captions(self, items) -> list[str]:
        ds, g = self.dataset, self.g
        out = []
        for b, i in items:
            own = self.p.captions[b][i]
            if ds.caption_templates:
                own = ds.caption_templates[int(torch.randint(len(ds.caption_templates), (1,), generator=g))].format(
                    ds.template_token)
            out.append(process_caption(own, shuffle=ds.shuffle_captions, keep=ds.keep_tokens,
                                       dropout=ds.caption_dropout, generator=g))
        return out

    def closed_captions(self) -> set[str]:
        """Every caption a step can draw when captions are not shuffled: the pictures' own (or the templates'), and
        the empty one when captions are dropped."""
        ds = self.dataset
        if ds.caption_templates:
            caps = {t.format(ds.template_token) for t in ds.caption_templates}
        else:
            caps = {c for bucket in self.p.captions.values() for c in bucket}
        return caps | ({""} if ds.caption_dropout else set())

    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        if self.method.trains_text_encoder:
            return self.model.encode_prompts(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.text]
        with torch.no_grad():  # one at a time: batched, a caption's embedding differs in the last bits with the
            for c in missing:  # captions beside it, and a resumed run meets its captions beside others
                self.text[c] = self.model.encode_prompts([c])[0]
        return torch.stack([self.text[c] for c in captions])

    def images(self, items) -> tuple[torch.Tensor, dict]:
        """Latents of this rank's slice of the global batch ``items``, and the pictures (after augmentation) and
        paired conditions they came from."""
        model, shard = self.model, self.shard
        b = items[0][0]
        idx = torch.tensor([i for _, i in items])
        px = self.p.pixels[b][idx]
        cond = self.p.conditions[b][idx] if self.p.conditions else None
        mask = self.p.masks[b][idx] if self.p.masks else None
        framing = shard.take(self.p.framing[b][idx]) if self.p.framing else None  # each picture's own
        if self.cache_latents:
            mean, std = self.latents[b]
            mine = shard.take(idx)
            eps = randn(mean[mine].shape, self.g, shard).to(mean.device)
            return self.latent_format.to_model(mean[mine] + std[mine] * eps).to(model.dtype), \
                {"pixels": shard.take(px), "conditions": None if cond is None else shard.take(cond),
                 "masks": None if mask is None else shard.take(mask), "framing": framing}
        moved = [t for t in (cond, mask) if t is not None]  # crops and flips move them with the picture
        geometry = {} if framing is not None else None
        if moved:
            px, both = augment_batch(px, self.dataset.augment, self.g, condition=torch.cat(moved, dim=1),
                                     geometry=geometry)
            if cond is not None:
                cond = shard.take(both[:, :3])
            if mask is not None:
                mask = shard.take(both[:, -1:])
        else:
            px = augment_batch(px, self.dataset.augment, self.g, geometry=geometry)
        if geometry is not None:
            framing = shard.take(augmented_framing(self.p.framing[b][idx], geometry))
        px = shard.take(px)
        with torch.no_grad():
            dist = model.vae.encode(px.to(model.vae.device, model.vae.dtype)).latent_dist
            eps = randn(dist.mean.shape, self.g, shard).to(dist.mean.device, dist.mean.dtype)
        latents = self.latent_format.to_model(dist.mean + dist.std * eps).to(model.dtype)
        return latents, {"pixels": px, "conditions": cond, "masks": mask, "framing": framing}


def augmented_framing(framing: torch.Tensor, geometry: dict) -> torch.Tensor:
    """Pictures' framing (original h, w, crop top, left, target h, w; SDXL's time ids) after a flip and a resized
    crop
    (:func:`augment_batch`'s ``geometry``). The picture was the centred (target) window of the original scaled to
    cover it; a flip mirrors that window in the scaled picture, and a crop of (hc, wc) resized back to the target
    is the same as scaling the picture target / hc times more and taking the target window at the crop's corner.
    The original size stays the original's."""
    from ..data.dataset import cover

    out = framing.clone()
    for i, (oh, ow, top, left, th, tw) in enumerate(framing.tolist()):
        nh, nw = cover(int(oh), int(ow), int(th), int(tw))[:2]
        if geometry["flipped"][i]:
            left = nw - left - tw
        y, x, hc, wc = geometry["box"][i].tolist()
        out[i, 2], out[i, 3] = round((top + y) * th / hc), round((left + x) * tw / wc)
    return out


def encode_latent_dists(model: FTModel, pixels: dict) -> dict:
    """bucket -> (mean, std) of the VAE's latent distribution for every picture, encoded a few at a time
    (:func:`~.model.vae_chunk`: 16 pictures up to 256 px, one at 1024 px)."""
    out = {}
    with torch.no_grad():
        for b, px in pixels.items():
            chunk = vae_chunk(px.shape[-2], px.shape[-1])
            dists = [model.vae.encode(px[i:i + chunk].to(model.device, model.vae.dtype)).latent_dist
                     for i in range(0, len(px), chunk)]
            out[b] = (torch.cat([d.mean for d in dists]).float(), torch.cat([d.std for d in dists]).float())
    return out
