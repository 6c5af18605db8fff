"""finetune/sample: generate images from an FT_MODEL."""
from __future__ import annotations

from . import host
from .base import COMBO, FLOAT, HIDDEN, INT, LINK, MAX_SEED, ROOT_CATEGORY, SEED, STRING, torch_call

#: "auto" (the model family's own sampler), then the keys of trainers.sampling.SAMPLERS (tested)
SAMPLER_NAMES = ["auto", "ddim", "euler", "euler_ancestral", "dpmpp_2m"]
RESIZE_MODES = ["crop", "fit", "stretch"]  # == trainers.adapters.controlnet.apply.RESIZE_MODES (tested)


def sample_images(model, prompt, negative_prompt, seed, steps, cfg, sampler, width, height, batch_size, control=None,
                  resize_mode="crop"):
    from ..trainers.sampling import Cancelled, sample

    if not str(prompt).strip():
        raise ValueError("prompt is empty: describe the image to generate (e.g. 'a red circle')")
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(batch_size)]
    with host.Progress(steps, desc="sampling") as bar:
        try:
            return sample(model, prompt, seeds=seeds, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                          sampler=sampler, width=width, height=height, on_step=lambda i, n: bar.update(i),
                          should_stop=host.interrupted, controls=tuple(control or ()), resize_mode=resize_mode)
        except Cancelled:
            host.raise_if_interrupted()
            raise


class FT_Sample:
    DESCRIPTION = ("Generate images from a prompt with an FT_MODEL (base or fine-tuned). Image i of a batch uses "
                   "seed + i, so it matches a single image made with that seed. Connect Apply ControlNet to control to "
                   "steer the layout. The output is a normal ComfyUI IMAGE: connect PreviewImage or SaveImage.")
    CATEGORY = f"{ROOT_CATEGORY}/sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The generated images (batch, height, width, RGB), values 0..1.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The model to sample: from FT_LoadBaseModel or a training node."),
                "prompt": STRING("a red circle on a white background", "What to draw.", multiline=True),
                "negative_prompt": STRING("", "What to steer away from (the unconditional side of guidance).",
                                          multiline=True),
                "seed": SEED("Seed of the first image; image i of the batch uses seed + i."),
                "steps": INT(20, 1, 500, "Denoising steps: more is slower and usually a little cleaner."),
                "cfg": FLOAT(0.0, 0.0, 30.0, "Classifier-free guidance scale: how strongly to follow the prompt "
                             "(1 = no guidance). 0 = auto, the model's own: 7.5 for SD 1.x and 2.x, 5 for SDXL and "
                             "Z-Image Base (their diffusers pipelines'), 1 for Z-Image Turbo (a file named turbo), 2 "
                             "for the toy and the toy SDXL (a new subject they learnt turns to blobs at higher "
                             "guidance), 4 for the other toys.", step=0.1),
                "sampler": COMBO(SAMPLER_NAMES, "The diffusers scheduler that takes the steps. auto: the model's own "
                                 "(DDIM for SD 1.x, 2.x, SDXL and the UNet toys; FlowMatch Euler with the family's "
                                 "shift for Z-Image, which only euler draws)."),
                "width": INT(0, 0, 4096, "Image width in pixels; 0 = the model's native size (32 for the toy, "
                             "512 for SD 1.x).", step=4),
                "height": INT(0, 0, 4096, "Image height in pixels; 0 = the model's native size.", step=4),
                "batch_size": INT(1, 1, 256, "How many images to make."),
            },
            "optional": {
                "control": LINK("FT_CONTROL", "ControlNet guidance from Apply ControlNet (several when chained)."),
                "resize_mode": COMBO(RESIZE_MODES, "How a control image of another size or shape is fitted to the "
                                     "generation size: crop (cover, then centre-crop), fit (letterbox on black) "
                                     "or stretch."),
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model, prompt, negative_prompt, seed, steps, cfg, sampler, width, height, batch_size,
                control=None, resize_mode="crop"):
        return (sample_images(model, prompt, negative_prompt, seed, steps, cfg, sampler, width, height, batch_size,
                              control, resize_mode),)
