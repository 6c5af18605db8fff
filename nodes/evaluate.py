"""finetune/evaluate: look at what training did."""
from __future__ import annotations

from . import host
from .base import COMBO, FLOAT, INT, LINK, ROOT_CATEGORY, STRING, checked, torch_call

CATEGORY = f"{ROOT_CATEGORY}/evaluate"


class FT_LossPlot:
    DESCRIPTION = "The training loss per step (raw, and smoothed with an exponential moving average) as an IMAGE."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The loss curve, for PreviewImage or SaveImage.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "log": LINK("FT_TRAINING_LOG", "The training log of a training node."),
            "width": INT(768, 256, 4096, "Picture width in pixels.", step=16),
            "height": INT(384, 128, 4096, "Picture height in pixels.", step=16),
        }}

    @torch_call
    def execute(self, log, width, height):
        import numpy as np
        import torch

        from ..trainers.eval.plots import loss_plot

        img = loss_plot(log.losses(), width, height, title=f"{log.run}: {log.steps} steps")
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None],)


TOY_CLIP = "toy (built-in)"


def scorer_choices() -> list[str]:
    return [TOY_CLIP] + host.list_models("clip_vision", folders=True, marker="config.json")


def _json_scores(values) -> str:
    import json

    return json.dumps([round(float(v), 4) for v in values])


class FT_LoadCLIPScorer:
    DESCRIPTION = ("Load a CLIP model (text and image towers) to score pictures: the built-in toy CLIP (made for the "
                   "toy world), or a transformers CLIP folder (config.json, model.safetensors, tokenizer) in "
                   "models/clip_vision. Loaded once per node and kept; never downloaded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_CLIP_SCORER",)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("The scorer, for CLIP Score, CLIP Image Similarity, KID and Compare Grid.",)
    FUNCTION = "execute"

    def __init__(self):
        self._cache = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": COMBO(scorer_choices(), "The CLIP model: the toy one, or a folder in models/clip_vision."),
            "device": COMBO(["auto", "cpu", "cuda"], "Where scoring runs (auto: the GPU when there is one)."),
        }}

    @torch_call
    def execute(self, clip_name, device):
        from ..trainers.model.loading import resolve_device
        from ..trainers.eval.metrics import load_clip_scorer

        key = (clip_name, device)
        if self._cache is None or self._cache[0] != key:
            if clip_name == TOY_CLIP:
                from ..trainers.toy.loader import WEIGHTS

                folder = WEIGHTS / "clip"
            else:
                folder = host.model_path("clip_vision", clip_name)
            self._cache = (key, load_clip_scorer(folder, resolve_device(device), clip_name))
        return (self._cache[1],)


def _progress(n: int, what: str):
    bar = host.Progress(n, desc=what)
    return bar, (lambda done: bar.update(done))


class FT_CLIPScore:
    DESCRIPTION = ("CLIP-T, prompt fidelity: 100 x max(cosine(image, prompt), 0) for each picture, as torchmetrics' "
                   "CLIPScore defines it. One prompt for the whole batch, or one line per picture.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("clip_t", "per_image")
    OUTPUT_TOOLTIPS = ("The mean score over the batch (0-100, higher = closer to the prompt).",
                       "Every picture's score, as a JSON list.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scorer": LINK("FT_CLIP_SCORER", "The CLIP model that scores."),
            "images": LINK("IMAGE", "The pictures to score."),
            "prompt": STRING("a red circle", "One prompt for every picture, or one line per picture.",
                             multiline=True),
        }}

    @torch_call
    def execute(self, scorer, images, prompt):
        from ..trainers.eval.metrics import check_images, clip_t, split_prompts

        check_images(images, "images")
        prompts = split_prompts(prompt, images.shape[0])
        bar, tick = _progress(images.shape[0], "CLIP-T")
        with bar:
            scores = clip_t(scorer, images, prompts, tick)
        return {"ui": {"text": [f"CLIP-T {float(scores.mean()):.2f} over {len(scores)} pictures"]},
                "result": (float(scores.mean()), _json_scores(scores))}


class FT_CLIPImageSimilarity:
    DESCRIPTION = ("CLIP-I, subject fidelity (as in the DreamBooth paper): the mean pairwise cosine similarity between "
                   "the CLIP image embeddings of generated pictures and of reference pictures of the subject.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("clip_i", "per_image")
    OUTPUT_TOOLTIPS = ("Mean pairwise cosine (-1..1, higher = more like the references).",
                       "Each generated picture's mean cosine to the references, as a JSON list.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scorer": LINK("FT_CLIP_SCORER", "The CLIP model that scores."),
            "images": LINK("IMAGE", "Generated pictures."),
            "reference_images": LINK("IMAGE", "Real pictures of the subject (e.g. the training set)."),
        }}

    @torch_call
    def execute(self, scorer, images, reference_images):
        from ..trainers.eval.metrics import check_images, clip_i

        check_images(images, "images")
        check_images(reference_images, "reference_images")
        bar, tick = _progress(images.shape[0], "CLIP-I")
        with bar:
            mean, per = clip_i(scorer, images, reference_images, tick)
        return {"ui": {"text": [f"CLIP-I {mean:.4f}"]}, "result": (mean, _json_scores(per))}


class FT_KID:
    DESCRIPTION = ("Kernel inception distance between two picture sets (unbiased polynomial-kernel MMD^2, mean and "
                   "std over random subsets), computed on the loaded CLIP image tower's features: this is CLIP-KID, "
                   "not Inception-KID (Inception weights cannot be had offline), so compare values only between "
                   "runs that use the same scorer. A subset size larger than the smaller set shrinks to half of it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("kid", "kid_std", "info")
    OUTPUT_TOOLTIPS = ("KID (about 0 for one distribution; larger = more different).",
                       "Standard deviation over the subsets.",
                       "What was computed: features, subset size and count.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scorer": LINK("FT_CLIP_SCORER", "Whose image tower gives the features."),
            "images_a": LINK("IMAGE", "First picture set (e.g. generated)."),
            "images_b": LINK("IMAGE", "Second picture set (e.g. real)."),
            "subsets": INT(100, 1, 10000, "How many random subsets to average over."),
            "subset_size": INT(1000, 2, 100000, "Pictures per subset; more than the smaller set holds becomes half "
                               "that set."),
            "seed": INT(0, 0, 2 ** 31 - 1, "Seed of the subset draws."),
        }}

    @torch_call
    def execute(self, scorer, images_a, images_b, subsets, subset_size, seed):
        from ..trainers.eval.metrics import check_images, kid

        check_images(images_a, "images_a")
        check_images(images_b, "images_b")
        n = images_a.shape[0] + images_b.shape[0]
        bar, tick = _progress(n, "KID")
        with bar:
            fa = scorer.image_features(images_a, tick)
            fb = scorer.image_features(images_b, lambda d: tick(images_a.shape[0] + d))
        value, std, m = kid(fa, fb, subsets, subset_size, seed)
        info = (f"CLIP-KID on {scorer.name} image features ({scorer.feature_dim}-d), {subsets} subsets of {m} "
                f"({images_a.shape[0]} vs {images_b.shape[0]} pictures)")
        return {"ui": {"text": [f"KID {value:.5f} ± {std:.5f}", info]}, "result": (value, std, info)}


GRID_ROWS = 6


class FT_CompareGrid:
    DESCRIPTION = ("Side-by-side figure: each IMAGE input is a row (base, LoRA, Textual Inversion, DreamBooth, ...), "
                   "each picture of its batch a column (prompts or seeds), labelled; optionally each cell is "
                   "annotated with its CLIP-T. All rows must have the same picture size.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("The labelled grid.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"images_{i}": LINK("IMAGE", f"Row {i}.") for i in range(2, GRID_ROWS + 1)}
        optional["scorer"] = LINK("FT_CLIP_SCORER", "Connect to print each cell's CLIP-T under it.")
        return {
            "required": {
                "images_1": LINK("IMAGE", "Row 1 (e.g. the base model)."),
                "row_labels": STRING("base\nfine-tuned", "One label per row, one per line.", multiline=True),
                "column_labels": STRING("", "One label per column, one per line (empty: #1, #2, ...).",
                                        multiline=True),
                "prompts": STRING("", "For CLIP-T annotations: one prompt for every cell, or one line per row.",
                                  multiline=True),
                "cell_size": INT(128, 32, 1024, "Size of each cell in pixels (small pictures are enlarged "
                                 "without smoothing).", step=16),
            },
            "optional": optional,
        }

    @torch_call
    def execute(self, images_1, row_labels, column_labels, prompts, cell_size, scorer=None, **rows_in):
        import numpy as np
        import torch

        from ..trainers.eval.grids import labelled_grid
        from ..trainers.eval.metrics import check_images, clip_t

        named = [("images_1", images_1)] + [(f"images_{i}", rows_in[f"images_{i}"])
                                            for i in range(2, GRID_ROWS + 1) if rows_in.get(f"images_{i}") is not None]
        for name, imgs in named:
            check_images(imgs, name)
        size = tuple(images_1.shape[1:3])
        for name, imgs in named[1:]:
            if tuple(imgs.shape[1:3]) != size:
                raise ValueError(f"{name} has pictures of {imgs.shape[2]}x{imgs.shape[1]}, images_1 of "
                                 f"{size[1]}x{size[0]}: all rows need one size (resize with an Upscale Image node)")
        labels = [ln.strip() for ln in row_labels.splitlines() if ln.strip()]
        labels = (labels + [f"row {i + 1}" for i in range(len(labels), len(named))])[:len(named)]
        ncol = max(x.shape[0] for _, x in named)
        cols = [ln.strip() for ln in column_labels.splitlines() if ln.strip()]
        cols = (cols + [f"#{i + 1}" for i in range(len(cols), ncol)])[:ncol]
        notes = None
        if scorer is not None:
            lines = [ln.strip() for ln in prompts.splitlines() if ln.strip()]
            if not lines:
                raise ValueError("prompts: a scorer is connected, so give the prompt(s) to score against "
                                 "(one for every cell, or one line per row)")
            if len(lines) not in (1, len(named)):
                raise ValueError(f"prompts has {len(lines)} lines for {len(named)} rows: give one, or one per row")
            notes = []
            for r, (_, imgs) in enumerate(named):
                p = lines[0] if len(lines) == 1 else lines[r]
                notes.append([f"CLIP-T {s:.1f}" for s in clip_t(scorer, imgs, [p] * imgs.shape[0]).tolist()])
        img = labelled_grid([list(x) for _, x in named], labels, cols, cell=cell_size, notes=notes)
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None],)


METRIC = lambda tip: FLOAT(0.0, -1e9, 1e9, tip, step=0.0001, forceInput=True)  # noqa: E731


class FT_EvalReport:
    DESCRIPTION = ("Collect scores into a results table: every run of this node adds one row (the variant and its "
                   "scores) to output/finetune/reports/<report>.csv and .json, and shows the whole table, so a sweep "
                   "queued through the API can be compared afterwards.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("table",)
    OUTPUT_TOOLTIPS = ("The report so far, as a text table.",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "report": STRING("evaluation", "Report name: rows of the same report go into one table."),
                "variant": STRING("base", "Name of this row (e.g. base, lora-r8, dreambooth-pp)."),
            },
            "optional": {
                "clip_t": METRIC("CLIP-T from CLIP Score."),
                "clip_i": METRIC("CLIP-I from CLIP Image Similarity."),
                "kid": METRIC("KID from KID."),
                "kid_std": METRIC("KID's standard deviation."),
                "notes": STRING("", "Free text stored with the row (settings, seed, ...)."),
            },
        }

    @checked
    def execute(self, report, variant, clip_t=None, clip_i=None, kid=None, kid_std=None, notes=""):
        from ..trainers.runs.reports import add_row, format_table

        rel = host.safe_relative(report.strip() or "evaluation", "report")
        folder = host.output_dir() / "finetune" / "reports"
        row = {"variant": variant, "clip_t": clip_t, "clip_i": clip_i, "kid": kid, "kid_std": kid_std,
               "notes": notes}
        rows = add_row(folder, rel.as_posix().replace("/", "_"), row)
        table = format_table(rows)
        return {"ui": {"text": [table]}, "result": (table,)}
