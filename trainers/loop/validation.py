"""Validation pictures during training, and keeping the best checkpoint by their score: the answer to "which step
should I use?".

With ``keep_best`` on, every save point (``save_every``) and the last step make validation pictures of
``validation_prompt`` (seeds seed, seed + 1, …) and score them with a CLIP scorer: CLIP-T against the prompt,
CLIP-I against the training pictures, or both (their mean, CLIP-T taken on its 0-1 scale). The run's result is the
best-scoring checkpoint, not the last step; with ``early_stop_after`` N the run stops after N save points without a
better score. Scores go into the step's row of ``log.jsonl`` and into ``status.json`` (best step and score).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

#: what keep_best can rank by
RANKINGS = ("off", "clip_t", "clip_i", "clip_t+clip_i")


class OutOfMemory(torch.OutOfMemoryError):
    """The GPU ran out of memory making validation pictures: the loop passes on this advice, not its training one."""


def check(cfg, scorer) -> None:
    """What keep_best needs, named before any work."""
    if cfg.keep_best == "off":
        if cfg.early_stop_after:
            raise ValueError("early_stop_after stops when the score stops improving: set keep_best too")
        return
    if scorer is None:
        raise ValueError(f"keep_best {cfg.keep_best!r} scores checkpoints with CLIP: connect a Load CLIP Scorer node "
                         "to the training node's scorer input (or give --scorer to the shell's train)")
    if not cfg.validation_prompt.strip():
        raise ValueError(f"keep_best {cfg.keep_best!r} scores the pictures of validation_prompt: give one (e.g. the "
                         "prompt you will use with the result)")
    if not cfg.save_every:
        raise ValueError(f"keep_best {cfg.keep_best!r} compares checkpoints: set save_every (how often to write and "
                         "score one)")


def reference_pictures(dataset, size: int) -> torch.Tensor:
    """The training pictures as one IMAGE batch (B, size, size, 3) for CLIP-I, each resized to a square."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(e.image).convert("RGB").resize((size, size), Image.BICUBIC))
           for e in dataset.examples]
    return torch.from_numpy(np.stack(out)).float() / 255.0


@dataclass
class BestKeeper:
    ranking: str
    scorer: object
    refs: torch.Tensor
    patience: int = 0
    best_step: int | None = None
    best_value: float = float("-inf")
    since_best: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, cfg, scorer, dataset) -> "BestKeeper | None":
        """The keeper of a run (None with keep_best off); :func:`check` has vetted ``cfg`` and ``scorer`` first."""
        if cfg.keep_best == "off":
            return None
        return cls(cfg.keep_best, scorer, reference_pictures(dataset, scorer.image_size), cfg.early_stop_after)

    def score(self, images: torch.Tensor, prompt: str) -> dict:
        from ..eval.metrics import clip_i, clip_t

        ct = float(clip_t(self.scorer, images, [prompt] * len(images)).mean())
        ci, _ = clip_i(self.scorer, images, self.refs)
        value = {"clip_t": ct / 100, "clip_i": ci, "clip_t+clip_i": (ct / 100 + ci) / 2}[self.ranking]
        return {"clip_t": round(ct, 4), "clip_i": round(ci, 5), "score": round(value, 6)}

    def record(self, step: int, scores: dict) -> bool:
        """Note the scores of ``step``; True when the run should stop (no better score for ``patience`` saves)."""
        self.history.append({"step": step, **scores})
        if scores["score"] > self.best_value:
            self.best_step, self.best_value, self.since_best = step, scores["score"], 0
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience

    def status(self) -> dict:
        return {"best_step": self.best_step, "best_score": self.best_value, "ranking": self.ranking}

    def replay(self, rows: list[dict]) -> None:
        """A resumed run's earlier scores (from its log), so the best is the best of the whole run."""
        for r in rows:
            if "score" in r:
                self.record(r["step"], {k: r[k] for k in ("clip_t", "clip_i", "score") if k in r})


def size(model, resolution: int) -> int:
    """The side of the validation pictures: the training resolution (a square of its area, rounded down to a size
    the model can make), or the model's native size when the dataset trains at it (resolution 0). An SDXL trained
    at 512 px is shown at 512 px, at a quarter of the native size's memory and time."""
    if not resolution:
        return model.native_size
    return max(model.size_step, resolution // model.size_step * model.size_step)


def pictures(model, method, cfg, run, step: int, contexts, resolution: int = 0, draw=None) -> torch.Tensor:
    """Validation pictures of ``validation_prompt`` (seeds seed, seed + 1, ...) made with the weights the result
    would be (under ``contexts``: autocast, averaged weights) at the training resolution (:func:`size`), kept in the
    run's samples/. ``draw(model, method, seeds, width, height)`` draws them in the pack's sampler's place (inside
    ComfyUI: ComfyUI's own, nodes/comfy_preview.py); the pack's sampler takes validation_steps and validation_cfg."""
    from ..eval.grids import to_pil
    from ..sampling import sample

    mods = method.train_modules(model)
    for m in mods:
        m.eval()
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        with torch.no_grad():
            side = size(model, resolution)
            kw = {"width": side, "height": side, **method.sample_kwargs()}  # a method's own size comes first
            seeds = [cfg.seed + i for i in range(cfg.validation_images)]
            try:
                if draw is not None:
                    imgs = draw(model, method, seeds, kw["width"], kw["height"])
                else:
                    imgs = sample(model, cfg.validation_prompt, seeds=seeds, steps=cfg.validation_steps,
                                  cfg=cfg.validation_cfg, **kw)
            except torch.OutOfMemoryError as e:
                pack = ("set validation_sampler pack (ComfyUI's sampler loads its own copy of the model), "
                        if draw is not None else "")
                raise OutOfMemory(f"out of GPU memory making step {step}'s validation pictures ({kw['width']} x "
                                  f"{kw['height']} px): lower validation_images ({cfg.validation_images}), {pack}or "
                                  "set validation_every 0 (and keep_best off) to make none") from e
    for m in mods:
        m.train()
    if run.writes:
        folder = run.path / "samples"
        folder.mkdir(exist_ok=True)
        for i, im in enumerate(imgs):
            to_pil(im).save(folder / f"step-{step}-{i}.png")
        if model.family.sound_preset:
            sounds(imgs, model.family.sound_preset, folder, step, cfg.seed)
    return imgs


def sounds(imgs: torch.Tensor, preset: str, folder, step: int, seed: int) -> None:
    """The sound of each validation spectrogram, as ``step-<N>-<i>.wav`` beside its picture (Griffin-Lim seeded by
    the run's seed, so the base's and the tuned model's sounds at a seed differ only by what was learned)."""
    from ..audio.files import write_wav
    from ..audio.spectrogram import get_preset, to_audio

    waves = to_audio(imgs.float().cpu(), preset, iterations=32, seed=seed, join="batch")
    for i, w in enumerate(waves):
        write_wav(folder / f"step-{step}-{i}.wav", w.numpy(), get_preset(preset).sample_rate)
