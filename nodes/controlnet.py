"""finetune/controlnet: condition images made offline with kornia (no annotator model is downloaded).

One small base class builds the family; each preprocessor is a few lines naming its inputs and the published
SD 1.5 ControlNet it matches. The outputs are ordinary IMAGE tensors, so they also feed ComfyUI's own
ControlNetApplyAdvanced and PreviewImage.
"""
from __future__ import annotations

from .base import FLOAT, INT, LINK, ROOT_CATEGORY, torch_call

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
        from ..trainers.preprocess import canny

        return canny(image, low_threshold, high_threshold)


class FT_SoftEdges(_Preprocessor):
    DESCRIPTION = ("Soft edges: the Sobel gradient magnitude, normalised per picture, for the soft-edge ControlNet "
                   "(lllyasviel/control_v11p_sd15_softedge), without its HED/PiDiNet annotator download.")

    @staticmethod
    def run(image):
        from ..trainers.preprocess import soft_edges

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
        from ..trainers.preprocess import scribble

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
        from ..trainers.preprocess import tile_blur

        return tile_blur(image, downscale, blur_sigma)


class FT_Grayscale(_Preprocessor):
    DESCRIPTION = ("Grayscale (3 equal channels), for recolouring ControlNets (e.g. ioclab/control_v1p_sd15_brightness) "
                   "or as a plain luminance condition.")

    @staticmethod
    def run(image):
        from ..trainers.preprocess import grayscale

        return grayscale(image)
