"""The hand-written parts of the nodes' help pages (rendered by :mod:`.help_pages`): the pictures, the training
nodes' sections (what the method is for, first settings on the toy and on SD 1.5, what the node shows) and short tips.
Markdown; regenerate the pages after an edit: ``python -m comfyui_finetune.nodes.help_pages``."""
from __future__ import annotations

#: node class -> (picture file in docs/, what it shows)
PICTURES = {
    "FT_LoadBaseModel": ("toy_overview.png", ("What the built-in toy model draws: every colour and shape it knows "
                         "(purple and cross are never shown to it: they are what fine-tuning teaches).")),
    "FT_TrainLoRA": ("toy_lora.png", ("A LoRA trained on 8 pictures of a purple star ('a sks star', 200 steps): the "
                     "toy base model has never drawn purple; with the LoRA every seed does. The toy judge's verdict is "
                     "under each picture.")),
    "FT_TrainTextualInversion": ("toy_textual_inversion.png", ("Textual Inversion on 8 yellow triangles (the "
                                 "template toy_textual_inversion, 300 steps): the base model does not know the word "
                                 "<yt> and draws green shapes for 'a <yt>'; the learned word (started from "
                                 "'triangle') draws yellow triangles, a pairing the base model never saw.")),
    "FT_TrainDreamBooth": ("toy_dreambooth.png", ("DreamBooth (full) on 8 purple stars, without and with prior "
                           "preservation (PP). Both learn 'a sks star'; without PP the class prompt 'a star' turns "
                           "purple too, with PP it keeps the base model's stars.")),
    "FT_TrainControlNet": ("toy_controlnet.png", ("The built-in toy ControlNet, trained with this node (Canny edges, "
                           "1500 steps): 'a yellow square' without control is always in the middle; with control it "
                           "follows the edges.")),
    "FT_ApplyControlNet": ("toy_controlnet.png", ("Canny edges of blue squares, then 'a yellow square' without and "
                           "with the toy ControlNet applied.")),
}

_CHART = """## What the node shows

- **The loss chart**, live while it trains: the loss per step (thin line: raw, thick line: smoothed), the learning rate
  (dashed, scaled to its maximum), and the run's name, step / total, loss, speed (it/s) and the time left. The chart is
  kept with the workflow: it comes back after a reload, in a reopened workflow and from the queue history. The loss
  of diffusion training is noisy by nature: read the smoothed line, and judge by the pictures rather than by the loss.
- **Validation pictures** under the chart, when `validation_prompt` and `validation_every` are set: the latest ones
  after the run (every validation is kept in `output/finetune/<run>/samples/`), and the first picture of each
  validation as the node's live preview while it runs. Inside ComfyUI, ComfyUI draws them itself
  (`validation_sampler` auto): the model as Model to ComfyUI gives it, what is training applied as LoraLoader (or
  `embedding:<name>`) applies the saved file, CLIPTextEncode, KSampler's sampler and scheduler
  (`validation_sampler_name`, `validation_scheduler`, `validation_steps`, `validation_cfg`) and VAE Decode, so a
  preview is what you will get from the saved file at those settings (a ControlNet: through Apply ControlNet
  (Advanced) on the run's condition). The pack's own sampler draws outside ComfyUI and for the toys (the log says
  why).
- **Show advanced options**: the loop's less common options are folded away until you press the button; folded
  inputs keep their values (they are marked *advanced* below)."""

#: node class -> Markdown sections after the description (the training nodes)
EXTRA = {
    "FT_TrainLoRA": """## What it is for

A LoRA is a small adapter (a few MB on SD 1.5) that teaches a style, an object or a character from tens of captioned
pictures. The base model is not changed; the LoRA can be saved (Save LoRA), stacked with others (Apply LoRA) and
loaded by ComfyUI's own LoraLoader, A1111/Forge and diffusers. It is the usual first choice. `adapter` picks the kind:
`lora`, LyCORIS `loha` (more capacity at the same rank) and `lokr` (the smallest files, good for styles), or `dora`
(a LoRA plus a learned magnitude per input channel: closer to a full fine-tune at the same rank, a little slower).

## First settings

- **On the toy** (the template *toy_train_lora*): Toy Dataset with 8 purple stars captioned `a sks star`, then
  `steps` 200, `learning_rate` 0 (auto: 1e-3 on the toy), `batch_size` 4, `rank` 8, `alpha` 8, `target_modules`
  attention+feedforward, `validation_prompt` `a sks star` every 50 steps. About 15 s on a CPU.
- **`learning_rate` 0 = auto** picks the rate of the model's family: 1e-4 on SD 1.x, 2.x and SDXL, 1e-3 on the toys;
  times 4 for `lokr` (its Kronecker factor starts at zero: on the toy at LoRA's rate it drew the new concept in 12 % of
  pictures); divided by 3 with the lion optimizer, 1.0 with prodigy. The log and the run's config.json say what it
  chose and why; a typed number is used as it is.
- **`target_modules` auto** picks the family's layers: attention on SD 1.x, 2.x and SDXL (the usual LoRA), attention +
  feed-forward + convolutions on the toys, whose colours are drawn in their convolutional top level (on attention
  alone a toy LoRA draws a new colour as a blob, or not at all).
- **On SD 1.5**: Load Image Dataset (the dataset's `resolution` 0 is the model's own 512), `learning_rate` auto,
  `rank` 8-16 with `alpha` equal to it, `target_modules` auto (attention), `batch_size` 1-4, and the default 500 steps as a
  first look: set a `validation_prompt` and `validation_every` (e.g. 100) and `save_every`, and train further with
  `resume_run` if the concept is not there yet. On a GPU with little memory set `gradient_checkpointing` to on (auto already does for SDXL).

""" + _CHART,
    "FT_TrainTextualInversion": """## What it is for

Textual Inversion learns a new word only (a few KB): the word's embedding vectors, nothing else, so every other weight
stays bit-identical and the word works in any prompt (`embedding:<name>` in ComfyUI after Save Embedding). It can only
recombine what the base model already draws: on the toy it learns 'yellow triangle' (a pairing the toy never saw),
but it cannot teach purple, a colour the toy never drew (use a LoRA for that). Use it for a look the model can almost
make.

## First settings

- **On the toy** (the template *toy_textual_inversion*): 8 yellow triangles captioned `a <yt>`, `token` `<yt>`,
  `init_token` triangle, `num_vectors` 1, `steps` 300, `learning_rate` 0 (auto: 0.02 on the toys), `batch_size` 4,
  `caption_mode` dataset captions.
- **On SD 1.5**: 3-10 pictures, a new `token` in brackets (`<my-cat>`), an `init_token` that is one known word close to
  the concept (cat, painting) or several, one per vector (`blue star` with `num_vectors` 2: vector k starts from word
  k, cycling, as A1111's initialization text does), `num_vectors` 1-4, `learning_rate` auto (5e-3 on SD 1.x, 2.x and SDXL; 1e-3 to 1e-2
  is usual) and 1000 steps, with a `validation_prompt` that uses the token. When the dataset's captions do not contain the token, choose
  `caption_mode` object templates (a thing) or style templates (a look).

""" + _CHART,
    "FT_TrainDreamBooth": """## What it is for

DreamBooth binds a rare identifier (`a sks dog`) to one subject (a person, a pet, an object) from 3-20 pictures, as a
LoRA (`mode` lora) or as a full fine-tune of the UNet (`mode` full: the strongest and largest). With
**prior preservation** every step also trains on pictures of the class (`a dog`), generated from the base model when
you give none (and cached), so the class word keeps its meaning. Several subjects train at once through DreamBooth
Subject nodes chained into `subjects`; `pivotal_tuning` also learns the identifier's embedding; the output model is a
valid input of another training node (two stages).

## First settings

- **On the toy** (the template *toy_dreambooth*): 8 purple stars, `instance_prompt` `a sks star`, `class_prompt`
  `a star`, `mode` full, `steps` 200, `learning_rate` 0 (auto: 4e-4 in full mode on the toy), `batch_size` 4,
  `num_class_images` 32, once without and once with `prior_preservation`: without it 'a star' turns purple every time, with it never.
- **The trade-off, measured on the toy** (purple circles 'a sks circle', 16 class pictures, 5 seeds): prior
  preservation keeps the class without costing the subject once it has enough steps. In lora mode at lr 1e-3, 200
  steps left 'a circle' purple 0.16-0.22 of the time in 2 of 5 seeds, 400 steps in none, the subject 1.00 either
  way; `prior_loss_weight` 2 or 64 class pictures helped less than the steps (0.22 to 0.12 / 0.16). In full mode the
  learning rate decides it: two subjects at 300 steps drift 0.55 at 1e-4, 0.01 at 4e-4.
- **With every default on the toy** (`steps` and `learning_rate` auto: 800 steps per subject at 2e-3, prior
  preservation on 100 class pictures), the eight new subjects the toy world makes that are not crosses are drawn in
  0.94-1.00 of their pictures on each of 3 seeds, their class drifting at most 0.03 (`python
  benchmarks/bench_concepts.py --pp on --seeds 0,1,2`). Both UNet toys sample at cfg 2 (the Sample node's cfg 0 =
  auto): on the toy SDXL a new colour it learnt turns to blobs at 4.
- **The class must be one the base model draws.** Prior preservation learns the class from its class pictures, and
  the subject's prompt differs from the class's by one word, so the subject is pulled toward what they show. The
  toy never drew a cross: its "a cross" pictures are squares and circles, and crosses trained beside them reach
  0.62-0.78 (0.80-0.88 without prior preservation). Given 100 crosses in the base's colours as `class_dataset`, the
  red and yellow cross reach 0.94-0.97 on each of 3 seeds, the purple cross 0.72-0.97. If the base draws your class
  badly, give your own class pictures. Connect a CLIP scorer (Load CLIP Scorer) to `scorer` and the node checks
  before training: it warns when the class pictures score under half of the subject's own pictures against the class
  prompt (the toy CLIP gives the toy's "a cross" pictures 0, its crosses 39-81).
- **On SD 1.5**: 3-20 pictures of the subject, an identifier that means nothing yet (`sks`), the class as the model
  knows it, `prior_preservation` on with the default 100 class pictures and `steps` auto (400 per subject on SD 1.x,
  2.x, SDXL, Z-Image and the toy audio model, 800 on the toy, the toy SDXL and the toy Z-Image, whose full mode
  takes 400; several subjects get that many each);
  `learning_rate` auto picks 1e-4 in lora mode (times 4 for `lokr`) and 5e-6 in full mode on SD 1.x, 2.x and SDXL,
  2e-3 on the toy, the toy SDXL and the toy Z-Image (1e-3 on the toy audio model) and 4e-4 in full mode on the
  toy and the toy SDXL (2e-4 on the other toys); `batch_size` auto picks 1 (4 on the toy Z-Image in lora mode);
  `target_modules` auto picks attention + feed-forward on SD, and adds the convolutions on the toys (where a new
  colour is drawn). Full mode copies and trains the whole UNet: it needs far more GPU memory than
  lora mode (`gradient_checkpointing` helps). Watch a `validation_prompt` with the identifier and one with the class
  prompt alone: the second should not turn into your subject.

""" + _CHART,
    "FT_TrainControlNet": """## What it is for

A ControlNet adds a new *input* rather than a new concept: the model learns to follow a condition image (edges, a
scribble, a blurred tile, a grey picture) while the prompt still decides what is drawn. Train one when no published
ControlNet matches your condition (a preprocessor of your own, a domain of your own). It starts as a copy of the
model's UNet encoder whose output convolutions are zero, so at step 0 it changes nothing; only the ControlNet trains.
Vary position and size in the training pictures: the condition is what should carry the layout.

## First settings

- **On the toy** (the template *toy_train_controlnet*): 256 toy pictures of any colour and shape with `geometry`
  broad, `preprocessor` canny with `low_threshold` 0.1 and `high_threshold` 0.2 (the toy's pictures are faint for the
  defaults), `steps` 300, `learning_rate` 0 (auto: 1e-3 on the toys), `batch_size` 8, `caption_dropout` 0.3. About 50 s on a CPU; 150 steps
  already raise the mask IoU of off-centre shapes from 0.16 to 0.73.
- **On SD 1.5**: the defaults (`learning_rate` auto, 1e-5 on SD 1.x, 2.x and SDXL, `batch_size` 4, `caption_dropout` 0.5) with many varied pictures.
  A ControlNet often starts following its condition only after some thousands of steps: use `save_every`, a
  `validation_prompt` and `resume_run` to train in stages, and `grad_accum` for a larger effective batch.

""" + _CHART,
}

#: node class -> a short tip (Markdown), after the outputs
TIPS = {
    "FT_Sample": "Image *i* of a batch uses seed + *i*: a picture you like in a batch can be made alone again with "
                 "its seed.",
    "FT_LoadImageDataset": "Put the pictures in a subfolder of ComfyUI's `input/` folder (the list is read when "
                           "ComfyUI starts or refreshes); a caption file `name.txt` beside `name.png` wins over the "
                           "caption input.",
    "FT_ToyDataset": "Purple and cross are never shown to the toy base model: a dataset of them shows what training "
                     "adds. `{color}` and `{shape}` in the caption are filled in per picture.",
    "FT_ApplyLoRA": "The result shares the model's weights: a chain of Apply LoRA nodes costs only the LoRAs' own "
                    "memory.",
    "FT_SaveLoRA": "The file lands in `models/loras`, so ComfyUI's own LoraLoader lists it after a refresh.",
    "FT_SaveEmbedding": "Use the saved file in any ComfyUI prompt as `embedding:<name>`.",
    "FT_CannyEdges": "The outputs are plain `IMAGE`s: ComfyUI's own ControlNet nodes take them too.",
    "FT_KID": "KID needs tens of pictures per set to mean much; compare values only between runs with the same scorer.",
}
