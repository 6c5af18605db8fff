"""Evaluation metrics on CLIP features: CLIP-T (prompt fidelity), CLIP-I (subject fidelity), CLIP-KID.

- CLIP-T as torchmetrics' CLIPScore defines it: 100 * max(cosine(image, text), 0), per image.
- CLIP-I as in the DreamBooth paper: the mean pairwise cosine between generated and reference image embeddings.
- KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets; here on the loaded CLIP image tower's features
  (CLIP-KID), because Inception weights cannot be had offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class CLIPScorer:
    """``FT_CLIP_SCORER``: a transformers CLIPModel with its tokenizer and image preprocessing settings."""

    model: object
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    device: torch.device = torch.device("cpu")
    batch_size: int = 64

    def __repr__(self) -> str:
        return f"CLIPScorer({self.name!r}, {self.image_size}px, {self.device})"

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE (B,H,W,3) 0..1 -> CLIP pixel values: shortest side to image_size (bicubic), centre crop,
        normalise, as CLIPImageProcessor does, but batched in torch on the scorer's device."""
        x = images[..., :3].permute(0, 3, 1, 2).to(self.device, torch.float32)
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """L2-normalised image embeddings (B, D)."""
        check_images(images, "images")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            f = self.model.get_image_features(pixel_values=self.preprocess(images[i:i + self.batch_size]))
            out.append(getattr(f, "pooler_output", f).float())
            if on_batch:
                on_batch(min(images.shape[0], i + self.batch_size))
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.tokenizer.model_max_length)
        f = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                         attention_mask=tok.attention_mask.to(self.device))
        return F.normalize(getattr(f, "pooler_output", f).float(), dim=-1)


def check_images(images, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{name} must be an IMAGE batch (batch, height, width, 3), got {shape}"
                         + (" (a MASK? convert it with a Mask to Image node)" if getattr(images, "ndim", 0) == 3
                            else ""))
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: there is nothing to score")


def load_clip_scorer(folder: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> CLIPScorer:
    """A CLIP model folder (transformers layout: config.json, model.safetensors, tokenizer and
    preprocessor_config.json). Only safetensors weights are read."""
    import json

    from transformers import CLIPModel, CLIPTokenizerFast

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder.name} is not a CLIP model folder: it has no config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "clip":
        raise ValueError(f"{folder.name} holds a {cfg.get('model_type')!r} model; CLIP scoring needs a full CLIP "
                         "model (model_type 'clip', with both the text and the image tower)")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder.name} has no .safetensors weights (pickled .bin files are refused)")
    with torch.inference_mode(False):
        model = CLIPModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True).eval()
    # the fast class reads tokenizer.json (all transformers 5 writes) and vocab.json + merges.txt alike, in 4.x and 5.x
    tok = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    pp = json.loads((folder / "preprocessor_config.json").read_text()) \
        if (folder / "preprocessor_config.json").is_file() else {}
    size = pp.get("crop_size", {}).get("height") if isinstance(pp.get("crop_size"), dict) else pp.get("crop_size")
    size = int(size or model.config.vision_config.image_size)
    mean = tuple(pp.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pp.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
    dev = torch.device(device)
    return CLIPScorer(model.to(dev), tok, size, mean, std, name or folder.name, dev)


def split_prompts(prompt: str, n: int) -> list[str]:
    """One prompt for the whole batch, or one per line for one per image."""
    lines = [ln.strip() for ln in str(prompt).splitlines() if ln.strip()]
    if not lines:
        raise ValueError("prompt is empty: give one prompt for every image, or one line per image")
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise ValueError(f"prompt has {len(lines)} lines for {n} images: give one prompt, or exactly one line "
                         "per image")
    return lines


def clip_t(scorer: CLIPScorer, images: torch.Tensor, prompts: list[str], on_batch=None) -> torch.Tensor:
    """Per-image CLIPScore: 100 * max(cos(image, its prompt), 0)."""
    img = scorer.image_features(images, on_batch)
    txt = scorer.text_features(prompts)
    return 100 * (img * txt).sum(-1).clamp_min(0)


def clip_i(scorer: CLIPScorer, images: torch.Tensor, references: torch.Tensor, on_batch=None):
    """(mean pairwise cosine, per-image mean cosine to the references)."""
    a = scorer.image_features(images, on_batch)
    b = scorer.image_features(references)
    sims = a @ b.T
    return float(sims.mean()), sims.mean(dim=1)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """(mean, std, subset size used) of the unbiased MMD^2 over random subsets.

    The subset size adapts to small sets: asked for more than the smaller set holds, it becomes half that set
    (at least 2), so the subsets still differ and the std still says something."""
    n = min(len(feats_a), len(feats_b))
    if n < 2:
        raise ValueError(f"KID needs at least 2 images in each set (got {len(feats_a)} and {len(feats_b)})")
    m = subset_size if subset_size <= n else max(2, n // 2)
    g = torch.Generator().manual_seed(seed)
    vals = []
    a, b = feats_a.double().cpu(), feats_b.double().cpu()
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        off = m * (m - 1)
        vals.append(float((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
                          - 2 * kxy.mean()))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)), m
