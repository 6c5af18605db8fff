"""finetune/controlnet: condition images made offline with kornia (no annotator model is downloaded), and
loading, applying and saving ControlNets (training is in train.py with the other trainers).

One small base class builds the family; each preprocessor is a few lines naming its inputs and the published
SD 1.5 ControlNet it matches. The outputs are ordinary IMAGE tensors, so they also feed ComfyUI's own
ControlNetApplyAdvanced and PreviewImage.
"""
from __future__ import annotations

from . import host, load_check
from .base import COMBO, FLOAT, HIDDEN, INT, LINK, ROOT_CATEGORY, STRING, checked, torch_call

CATEGORY = f"{ROOT_CATEGORY}/controlnet"


class _Preprocessor:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("condition",)
    OUTPUT_TOOLTIPS = ("The condition image (same size, 3 channels), for a ControlNet's image input.",)
    FUNCTION = "execute"
    OPTIONS: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": LINK("IMAGE", "The picture to turn into a condition."), **cls.OPTIONS}}

    @staticmethod
    def run(image, **options):
        raise NotImplementedError

    @torch_call
    def execute(self, image, *args, **options):
        options.update(zip(self.OPTIONS, args))  # positional options in INPUT_TYPES order
        return (self.run(image, **options),)


class FT_CannyEdges(_Preprocessor):
    DESCRIPTION = ("Canny edges (white lines on black) with kornia, for the canny ControlNet "
                   "(lllyasviel/control_v11p_sd15_canny). Thresholds as in ComfyUI's own Canny node.")
    OPTIONS = {
        "low_threshold": FLOAT(0.4, 0.01, 0.99, "Weaker edges above this are kept when they touch strong ones."),
        "high_threshold": FLOAT(0.8, 0.01, 0.99, "Edges above this are always kept."),
    }

    @staticmethod
    def run(image, low_threshold, high_threshold):
        from ..trainers.data.preprocess import canny

        return canny(image, low_threshold, high_threshold)


class FT_SoftEdges(_Preprocessor):
    DESCRIPTION = ("Soft edges: the Sobel gradient magnitude, normalised per picture, for the soft-edge ControlNet "
                   "(lllyasviel/control_v11p_sd15_softedge), without its HED/PiDiNet annotator download.")

    @staticmethod
    def run(image):
        from ..trainers.data.preprocess import soft_edges

        return soft_edges(image)


class FT_Scribble(_Preprocessor):
    DESCRIPTION = ("Scribble: strong edges thresholded and thickened into strokes, for the scribble ControlNet "
                   "(lllyasviel/control_v11p_sd15_scribble).")
    OPTIONS = {
        "threshold": FLOAT(0.3, 0.0, 1.0, "Edge strength (0-1 of the picture's strongest) that becomes a stroke."),
        "thickness": INT(3, 1, 64, "Stroke thickness in pixels."),
    }

    @staticmethod
    def run(image, threshold, thickness):
        from ..trainers.data.preprocess import scribble

        return scribble(image, threshold, thickness)


class FT_TileBlur(_Preprocessor):
    DESCRIPTION = ("Tile condition: the picture downsampled and blurred, for the tile ControlNet "
                   "(lllyasviel/control_v11f1e_sd15_tile), used to add detail when upscaling.")
    OPTIONS = {
        "downscale": FLOAT(4.0, 1.0, 64.0, "How much smaller the detail level becomes.", step=0.5),
        "blur_sigma": FLOAT(1.0, 0.0, 16.0, "Gaussian blur after downsampling (0 = none).", step=0.1),
    }

    @staticmethod
    def run(image, downscale, blur_sigma):
        from ..trainers.data.preprocess import tile_blur

        return tile_blur(image, downscale, blur_sigma)


class FT_Grayscale(_Preprocessor):
    DESCRIPTION = ("Grayscale (3 equal channels), for recolouring ControlNets (e.g. ioclab/control_v1p_sd15_brightness) "
                   "or as a plain luminance condition.")

    @staticmethod
    def run(image):
        from ..trainers.data.preprocess import grayscale

        return grayscale(image)


# --------------------------------------------------------------------------------------- load / apply / save --
TOY = "toy canny (built-in)"


def controlnet_choices() -> list[str]:
    return [TOY] + host.list_models("controlnet")


def load_controlnet(name: str):
    if name in (TOY, "toy"):
        from ..trainers.toy.loader import load_toy_controlnet

        return load_toy_controlnet()
    from ..trainers.adapters.controlnet.files import load_file

    return load_file(host.model_path("controlnet", name))


class FT_LoadControlNet:
    DESCRIPTION = ("Load a ControlNet: the built-in toy one (follows Canny edge maps of toy pictures), or a "
                   "file from models/controlnet: the original single-file layout (control_*.safetensors, as "
                   "ComfyUI and A1111 use) or the diffusers layout (a diffusers folder's weights file). SD 1.x, 2.x "
                   "and SDXL files are read with the configs shipped in the pack; nothing is downloaded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_CONTROLNET",)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The ControlNet, for Apply ControlNet (or to continue training it).",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net_name": COMBO(controlnet_choices(), "Which ControlNet: the built-in toy one, or a "
                                      ".safetensors file from models/controlnet.", TOY),
        }, "hidden": HIDDEN}

    @torch_call
    def execute(self, control_net_name):
        return (load_controlnet(control_net_name),)


class FT_ApplyControlNet:
    DESCRIPTION = ("Steer generation with a ControlNet and a condition image (e.g. Canny edges): the result goes to "
                   "Sample's control input. Chain several through 'previous' to combine ControlNets; each acts "
                   "with its own strength over its own part of the sampling (start/end percent).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_CONTROL",)
    RETURN_NAMES = ("control",)
    OUTPUT_TOOLTIPS = ("The control (with any previous ones), for Sample's control input.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net": LINK("FT_CONTROLNET", "From Load ControlNet or Train ControlNet."),
                "image": LINK("IMAGE", "The condition image (e.g. from Canny Edges); one picture, or one per "
                              "generated image. It is resized to the generation size (Sample's resize_mode)."),
                "strength": FLOAT(1.0, 0.0, 10.0, "How strongly the ControlNet steers (0 = not at all: exactly the "
                                  "image without it).", step=0.01),
                "start_percent": FLOAT(0.0, 0.0, 1.0, "Where in the sampling it starts acting (0 = first step).",
                                       step=0.001),
                "end_percent": FLOAT(1.0, 0.0, 1.0, "Where it stops acting (1 = last step). Ending early keeps the "
                                     "layout and frees the details.", step=0.001),
            },
            "optional": {"previous": LINK("FT_CONTROL", "Controls applied before this one (chain to combine "
                                          "several ControlNets).")},
        }

    @checked
    def execute(self, control_net, image, strength, start_percent, end_percent, previous=None):
        from ..trainers.adapters.controlnet.apply import Control
        from ..trainers.data.preprocess import check_image

        check_image(image, "image")
        return (tuple(previous or ()) + (Control(control_net, image.detach().cpu(), float(strength),
                                                 float(start_percent), float(end_percent)),),)


class FT_SaveControlNet:
    DESCRIPTION = ("Save a ControlNet into ComfyUI's models/controlnet folder as safetensors: the original layout "
                   "(control_model.*) that ComfyUI's ControlNetLoader, A1111 and diffusers' from_single_file read, or "
                   "the diffusers layout. The config is stored in the file too. Never overwrites: a counter is added. "
                   "Then the file is read back: inside ComfyUI by its ControlNetLoader, every weight as saved; "
                   "outside it by the pack's reader.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("control_net_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside the controlnet folder (as ControlNetLoader lists it).",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net": LINK("FT_CONTROLNET", "The ControlNet to save (from Train ControlNet)."),
            "filename": STRING("finetune/my_controlnet", "Subfolder and name inside models/controlnet (no "
                               "extension)."),
            "layout": COMBO(["original", "diffusers"], "original: control_model.* keys (ComfyUI, A1111, "
                            "diffusers from_single_file); diffusers: diffusers key names."),
            "dtype": COMBO(["fp16", "fp32", "bf16"], "Precision of the saved weights (fp16 halves the size)."),
        }}

    @checked
    def execute(self, control_net, filename, layout="original", dtype="fp16"):
        from ..trainers.adapters.controlnet.files import save

        root, rel = host.save_folder("controlnet", filename)
        meta = {"finetune_source": control_net.source}
        if control_net.meta.get("finetune_config"):
            meta["finetune_config"] = control_net.meta["finetune_config"]
        path = save(control_net, root / rel.parent, rel.name, layout, dtype, meta)
        name = path.relative_to(root).as_posix()
        host.log.info("saved ControlNet %s (%s layout, %s)", name, layout, dtype)
        checked = load_check.check_controlnet(path, control_net, layout, dtype)
        return {"ui": {"text": [f"saved controlnet/{name}", str(checked)]}, "result": (name,)}
