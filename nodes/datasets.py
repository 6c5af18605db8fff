"""finetune/datasets: load image datasets, make them from IMAGE batches, augment, preview."""
from __future__ import annotations

from . import host
from .base import BOOLEAN, COMBO, FLOAT, INT, LINK, ROOT_CATEGORY, STRING, checked, torch_call

CATEGORY = f"{ROOT_CATEGORY}/datasets"
NO_FOLDER = "(no subfolder in ComfyUI's input folder)"

#: options every dataset node offers (optional inputs; the defaults change nothing)
OPTIONS = {
    "repeats": INT(1, 1, 10000, "Show each picture this many times per epoch (balances small sets)."),
    "resolution": INT(0, 0, 4096, "Training resolution in pixels (a square's side, or a bucket's area as "
                      "side x side); 0 = the model's native size (32 for the toy, 512 for SD 1.x).", step=4),
    "bucketing": BOOLEAN(False, "Keep aspect ratios: resize each picture into a bucket of about resolution^2 "
                         "pixels with its own shape, instead of centre-cropping to a square."),
    "no_upscale": BOOLEAN(False, "Never enlarge a picture smaller than the resolution; train it at its own "
                          "size instead."),
    "caption_dropout": FLOAT(0.0, 0.0, 0.9, "Share of steps that see an empty caption (helps guidance-free "
                             "sampling; 0.05-0.1 is usual)."),
    "shuffle_captions": BOOLEAN(False, "Shuffle comma-separated caption parts every step (tag-style captions)."),
    "keep_tokens": INT(1, 0, 64, "With shuffling: how many leading comma-separated parts stay in place "
                       "(e.g. the identifier)."),
}


def _apply_options(ds, kw: dict):
    opts = {k: kw[k] for k in OPTIONS if k in kw}
    return ds.with_options(**opts) if opts else ds


def _folder_choices() -> list[str]:
    return host.input_subfolders() or [NO_FOLDER]


#: thumbnails a dataset node shows after it runs
SHOWN = 4


def dataset_ui(ds) -> dict:
    """What a dataset node shows after it runs: the count, the first pictures' captions and any warnings as text,
    and (inside ComfyUI) the first pictures as thumbnails in ComfyUI's temp folder."""
    import uuid

    from PIL import Image

    lines = [f"{len(ds.examples)} pictures x {ds.repeats} repeats ({ds.name})"]
    lines += [f"{e.name}: {e.caption}" for e in ds.examples[:SHOWN]]
    lines += [f"warning: {w}" for w in ds.warnings]
    ui: dict = {"text": ["\n".join(lines)]}
    folder = host.temp_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        ui["images"] = []
        tag = uuid.uuid4().hex[:8]
        for i, e in enumerate(ds.examples[:SHOWN]):
            pic = Image.fromarray(e.image)
            pic.thumbnail((128, 128))
            name = f"ft_dataset_{tag}_{i}.png"
            pic.save(folder / name)
            ui["images"].append({"filename": name, "subfolder": "", "type": "temp"})
    return ui


class ShowsDataset:
    """Base of the dataset loaders: ``execute`` returns the dataset (Python callers); ComfyUI calls ``load``, which
    also shows what was loaded in the node."""

    FUNCTION = "load"
    SHOWS = ("thumbnails", "text")  # room the example layouts leave for it (workflows.py)

    def load(self, *args, **kwargs):
        out = self.execute(*args, **kwargs)
        return {"ui": dataset_ui(out[0]), "result": out}


class FT_LoadImageDataset(ShowsDataset):
    DESCRIPTION = ("Load a folder of pictures from ComfyUI's input folder as a training dataset. Captions come from "
                   "name.txt beside name.png, or metadata.jsonl / metadata.csv (file_name, text), or the caption "
                   "input for pictures without one; captions in UTF-8, UTF-16 or a Windows code page. Every common "
                   "picture format Pillow reads (PNG, JPEG, WebP, BMP, GIF, TIFF, TGA, ...; HEIC with pillow-heif); "
                   "transparency, greyscale, 16-bit and CMYK are converted, an animation gives its first frame; "
                   "unreadable files and formats not read here are named in a warning. A picture's alpha channel, or a "
                   "name.mask.png beside it (white trains), is its loss mask (see the trainers' unmasked_weight).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The pictures with their captions and training options.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": COMBO(_folder_choices(), "A subfolder of ComfyUI's input folder holding the pictures "
                                "(upload them there, then refresh)."),
                "caption": STRING("a photo of {token}", "Caption for pictures that have no .txt or metadata "
                                  "caption; {token} is replaced by the token input."),
                "token": STRING("sks", "The word that stands for your concept in captions (a rare word like "
                                "'sks' works best)."),
            },
            "optional": dict(OPTIONS),
        }

    @classmethod
    def IS_CHANGED(cls, folder, **kw):
        """Re-run when a file in the folder is added, removed or changed."""
        import hashlib

        from ..trainers.data.names import find_nfc

        root = host.input_dir() / find_nfc(host.input_dir(), folder)
        h = hashlib.sha256(repr(sorted(kw.items())).encode())
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    @checked
    def execute(self, folder, caption, token, **options):
        from ..trainers.data.dataset import load_folder
        from ..trainers.data.names import find_nfc

        if folder == NO_FOLDER:
            raise ValueError("folder: there is no subfolder in ComfyUI's input folder; put your pictures in "
                             "input/<name>/ and refresh the page")
        host.inside(host.input_dir(), folder, "folder")  # the name is checked as given, then as spelled on disk
        path = host.inside(host.input_dir(), find_nfc(host.input_dir(), folder), "folder")
        return (_apply_options(load_folder(path, caption, token, options.get("repeats", 1)), options),)


class FT_DatasetFromImages(ShowsDataset):
    DESCRIPTION = ("Make a training dataset from an IMAGE batch made or loaded in the graph, with one caption for "
                   "all pictures or one caption per line, one line per picture, and optionally a MASK for a masked "
                   "loss.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The pictures with their captions and training options.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": LINK("IMAGE", "The pictures (a batch)."),
                "captions": STRING("a photo of sks", "One caption for every picture, or one line per picture.",
                                   multiline=True),
            },
            "optional": {"masks": LINK("MASK", "Where the loss counts (white = trains; the training's "
                                       "unmasked_weight sets the rest): one mask for all pictures or one per picture. "
                                       "Load Image's mask is white where a picture is transparent: invert it to train "
                                       "the opaque part."), **OPTIONS},
        }

    @torch_call
    def execute(self, images, captions, masks=None, **options):
        from ..trainers.data.dataset import from_images

        lines = [ln for ln in str(captions).splitlines() if ln.strip()] or [""]
        ds = from_images(images.detach().cpu().float().numpy(), lines)
        if masks is not None:
            from ..trainers.data.masks import attach

            ds = attach(ds, masks.detach().cpu().float().numpy())
        return (_apply_options(ds, options),)


class FT_Augment:
    DESCRIPTION = ("Random augmentation applied on the fly every step (kornia): horizontal flip, random resized "
                   "crop, colour jitter. Latents are then encoded every step instead of once.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET",)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The same dataset, augmented during training.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": LINK("FT_DATASET", "The dataset to augment."),
            "flip": FLOAT(0.5, 0.0, 1.0, "Probability of a horizontal flip (0 for text or asymmetric subjects)."),
            "crop_scale": FLOAT(1.0, 0.1, 1.0, "Smallest share of the area a random crop keeps (1 = no crop)."),
            "color_jitter": FLOAT(0.0, 0.0, 1.0, "Brightness/contrast/saturation jitter strength (0 = off; "
                                  "keep 0 when colour is part of the concept)."),
        }}

    @checked
    def execute(self, dataset, flip, crop_scale, color_jitter):
        from ..trainers.data.dataset import Augment

        return (dataset.with_options(augment=Augment(flip, crop_scale, color_jitter)),)


class FT_DatasetPreview:
    DESCRIPTION = "A contact sheet of the dataset's pictures with their captions, as an IMAGE for PreviewImage."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("Thumbnails with captions.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": LINK("FT_DATASET", "The dataset to show."),
            "max_images": INT(16, 1, 256, "Show at most this many pictures."),
            "thumbnail": INT(128, 32, 512, "Thumbnail size in pixels.", step=16),
        }}

    @torch_call
    def execute(self, dataset, max_images, thumbnail):
        import numpy as np
        import torch

        from ..trainers.data.dataset import resize_cover
        from ..trainers.eval.grids import labelled_grid

        ex = dataset.examples[:max_images]
        cols = min(4, len(ex))
        cells, notes = [], []
        for r in range(0, len(ex), cols):
            row = ex[r:r + cols]
            cells.append([resize_cover(e.image, thumbnail, thumbnail).astype(np.float32) / 255 for e in row])
            notes.append([(e.caption[:28] + "…") if len(e.caption) > 29 else e.caption for e in row])
        img = labelled_grid(cells, [""] * len(cells), [""] * cols, cell=thumbnail, notes=notes,
                            title=f"{dataset.name}: {len(dataset.examples)} pictures x {dataset.repeats} repeats")
        return (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None],)


class FT_ToyDataset(ShowsDataset):
    DESCRIPTION = ("Pictures from the built-in toy world, for trying training without any files: a colour and a "
                   "shape (purple and cross are concepts the toy base model has never seen), with a caption such "
                   "as 'a sks star'.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_DATASET", "IMAGE")
    RETURN_NAMES = ("dataset", "images")
    OUTPUT_TOOLTIPS = ("The pictures with the caption.", "The same pictures as an IMAGE batch.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainers.toy.world_names import ANY, COLORS, GEOMETRIES, SHAPES

        return {
            "required": {
                "color": COMBO(list(COLORS) + [ANY], "Colour of the shapes (purple was never shown to the toy base "
                               "model); any = a random base colour per picture.", "purple"),
                "shape": COMBO(list(SHAPES) + [ANY], "The shape (cross was never shown to the toy base model); any "
                               "= a random base shape per picture.", "star"),
                "count": INT(8, 1, 4096, "How many pictures."),
                "caption": STRING("a sks star", "The caption of every picture; {color} and {shape} are replaced by "
                                  "the picture's own (e.g. 'a {color} {shape}')."),
                "seed": INT(0, 0, 2 ** 31 - 1, "Seed of the pictures' sizes, positions and rotations."),
                "geometry": COMBO(list(GEOMETRIES), "narrow: centred and upright like the base model's training "
                                  "pictures; broad: any size, place and rotation."),
            },
            "optional": dict(OPTIONS),
        }

    @torch_call
    def execute(self, color, shape, count, caption, seed, geometry, **options):
        import numpy as np
        import torch

        from ..trainers.data.dataset import Dataset, Example
        from ..trainers.toy import world

        from ..trainers.toy.world_names import ANY

        geo = world.NARROW if geometry == "narrow" else world.BROAD
        pics = world.varied_set(None if color == ANY else color, None if shape == ANY else shape, count, seed,
                                caption, geometry=geo)
        tag = f"{'any' if color == ANY else color}-{'any' if shape == ANY else shape}"
        ds = Dataset([Example(p.image, p.caption, f"{tag}-{i}") for i, p in enumerate(pics)],
                     name=f"toy-{tag}", source=f"toy world seed {seed}")
        imgs = torch.from_numpy(np.stack([p.image for p in pics]).astype(np.float32) / 255)
        return (_apply_options(ds, options), imgs)
