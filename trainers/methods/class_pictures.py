"""DreamBooth's class pictures: the ones a subject's class dataset gives and the ones generated from the base model
(cached on disk, keyed by the model, prompt, count, resolution and seed), and a CLIP scorer's check that they show
their class."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config.recipes import DreamBoothRecipe
from ..model.model import FTModel
from .subjects import Subject

log = logging.getLogger(__name__)


def model_fingerprint(model: FTModel) -> str:
    h = hashlib.sha256(f"{model.family.name}|{model.name}|{json.dumps(model.history, default=str)}".encode())
    with torch.no_grad():
        for p in list(model.unet.parameters())[:4] + list(model.text_encoder.parameters())[:2]:
            h.update(np.ascontiguousarray(p.detach().float().cpu().numpy()).tobytes()[:4096])
    return h.hexdigest()[:16]


def class_images(model: FTModel, prompt: str, count: int, resolution: int, seed: int, cache_root: Path,
                 on_progress: Callable[[int, int], None] | None = None, batch: int = 8) -> tuple[list[np.ndarray], bool]:
    """``count`` pictures of ``prompt`` from ``model``; returns (pictures, generated_now).

    Cached under ``cache_root/<key>/``: the same model, prompt, count, resolution and seed load from disk."""
    from PIL import Image

    from ..sampling import sample_in_chunks

    key = hashlib.sha256(json.dumps([model_fingerprint(model), prompt, count, resolution, seed]).encode()).hexdigest()[:20]
    folder = cache_root / key
    manifest = folder / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        return [np.asarray(Image.open(folder / f).convert("RGB"), dtype=np.uint8) for f in files], False
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    pics: list[np.ndarray] = []
    with torch.no_grad():  # fewer at once when the GPU runs out of memory: the same pictures (a seed each)
        for imgs in sample_in_chunks(model, prompt, [seed + i for i in range(count)], batch, steps=25,
                                     cfg=model.family.class_cfg, width=resolution, height=resolution):
            pics += [(im.numpy() * 255).round().astype(np.uint8) for im in imgs]
            if on_progress:
                on_progress(len(pics), count)
    files = []
    for i, p in enumerate(pics):
        Image.fromarray(p).save(tmp / f"{i:05d}.png")
        files.append(f"{i:05d}.png")
    (tmp / "manifest.json").write_text(json.dumps({"prompt": prompt, "count": count, "resolution": resolution,
                                                   "seed": seed, "model": model.name, "files": files}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return pics, True


def gather_class_sets(recipe: DreamBoothRecipe, model: FTModel, subjects: list[Subject], cache: Path,
                      progress: Callable | None = None) -> list[tuple[list[np.ndarray], str]]:
    """Each subject's class pictures: its own class dataset first, the rest generated from ``model`` (cached
    under ``cache``). ``progress(total, desc)`` makes a progress bar (an object with update(n) and close())."""
    sets = []
    res = subjects[0].dataset.resolution or model.native_size
    mult = model.size_step
    if res % mult and any(recipe.num_class_images > len(s.class_dataset.examples if s.class_dataset else [])
                          for s in subjects):
        fit = max(mult, round(res / mult) * mult)
        raise ValueError(f"class pictures are generated at the dataset's resolution, {res} px, which is not a "
                         f"multiple of {mult} as this model needs: set the dataset's resolution to {fit}, or give "
                         "all the class pictures in class_dataset")
    for i, s in enumerate(subjects):
        given = [e.image for e in s.class_dataset.examples][:recipe.num_class_images] if s.class_dataset else []
        missing = recipe.num_class_images - len(given)
        made = []
        if missing > 0:
            bar = progress(missing, f"class pictures: {s.class_prompt}") if progress else None
            try:
                made, generated = class_images(model, s.class_prompt, missing, res, recipe.seed + 7919 * i, cache,
                                               (lambda d, n: bar.update(d)) if bar else None)
            finally:
                if bar:
                    bar.close()
            log.info("%s %d class pictures of %r", "generated" if generated else "reused cached", missing,
                     s.class_prompt)
        sets.append((given + made, s.class_prompt))
    return sets


#: the share of the subject's own pictures' likeness to the class prompt (median CLIP-T) that the class pictures
#: must reach: the subject is one of its class, so class pictures far below it show something else. The toy CLIP
#: against "a cross": the toy's crosses 39-81, the squares and circles the toy draws for "a cross" 0 (it never drew a
#: cross); for the classes it draws, its class pictures reach 0.63 (squares) to 1.26 (circles) of the purple
#: subject's. Not measured on a real CLIP (none can be had here)
CLASS_CHECK_SHARE = 0.5


def _clip_t_median(scorer, pictures: list[np.ndarray], prompt: str) -> float:
    """The median CLIP-T of uint8 (H, W, 3) pictures against ``prompt``, pictures of one size scored at once."""
    from ..eval.metrics import clip_t

    scores = []
    for shape in {p.shape for p in pictures}:
        same = [p for p in pictures if p.shape == shape]
        batch = torch.from_numpy(np.stack(same)).float().div(255)
        scores += clip_t(scorer, batch, [prompt] * len(same)).tolist()
    return float(np.median(scores)) if scores else 0.0


def check_class_sets(scorer, subjects: list[Subject], class_sets: list) -> list[dict]:
    """Whether each subject's class pictures show its class, by a CLIP scorer: their median CLIP-T against the class
    prompt beside the subject's own pictures' (CLASS_CHECK_SHARE). Prior preservation pulls the subject toward what
    the class pictures show, so a class the base model draws wrong is said (a warning) before any step trains."""
    found = []
    for s, (pictures, prompt) in zip(subjects, class_sets):
        theirs = _clip_t_median(scorer, [e.image for e in s.dataset.examples], prompt)
        ours = _clip_t_median(scorer, pictures, prompt)
        ok = ours >= CLASS_CHECK_SHARE * theirs
        found.append({"class_prompt": prompt, "class_clip_t": round(ours, 1), "subject_clip_t": round(theirs, 1),
                      "ok": ok})
        if not ok:
            log.warning("the class pictures of %r do not look like it: CLIP-T %.1f against the class prompt, where "
                        "the subject's own pictures (%s) score %.1f. Prior preservation will pull the subject toward "
                        "what they show: give class pictures of %r in class_dataset, or a class prompt the base "
                        "model draws", prompt, ours, s.instance_prompt, theirs, prompt)
    return found
