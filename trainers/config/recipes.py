"""Typed recipes: one declaration per training option, for the node, the run's config.json and the shell.

A recipe is a dataclass whose fields carry their default, range, choices and help text (:func:`option`). From it
come a training node's inputs and tooltips (``nodes.base.recipe_inputs``), validation with errors that name the
input (:meth:`Recipe.check`), the run's ``config.json`` (:func:`run_config`, written whole by the loop) and reading
a config back into the same typed object (:func:`read_config`). :class:`TrainConfig` holds the options of the shared
loop; each method's recipe extends it, overriding a shared option's default or help with :func:`like`.
:data:`METHODS` declares each method once: its recipe, its train function and its label.

The machinery (:func:`option`, :func:`like`, :class:`Recipe`) is in :mod:`.options`. This module imports no torch:
ComfyUI lists the nodes without loading the library.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from .options import (Recipe, _fmt, choices_of, like, library_object,  # noqa: F401 - choices_of: the nodes read it
                      option)

#: the pack's version (== pyproject.toml, tested); written into every config.json
PACK_VERSION = "0.1.0"
#: the layout of config.json; a newer one is refused with a clear error
CONFIG_FORMAT = 1
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
#: who draws validation pictures (nodes/comfy_preview.py): auto = ComfyUI's sampler inside ComfyUI where the model
#: and method can be handed to it, else the pack's
VALIDATION_SAMPLERS = ("auto", "comfyui", "pack")
#: KSampler's sampler_name and scheduler choices (ComfyUI 0.8's comfy.samplers lists; checked against the running
#: ComfyUI's own lists when a run draws with it)
COMFY_SAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2")
COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal")


# --------------------------------------------------------------------------------------------- the loop --
@dataclass
class TrainConfig(Recipe):
    """The shared loop's options (every training method has them)."""

    steps: int = option(500, "Optimizer steps in total (counting steps done before a resume).", min=1, max=1_000_000)
    learning_rate: float = option(0.0, "Peak learning rate. 0 = auto: the rate that fits the model's family and the "
                                  "method (and the adapter kind, the optimizer); the log and the run's config.json "
                                  "say which it chose. Type a number to set it yourself.", min=0.0, max=1.0,
                                  step=1e-5, round=False)
    batch_size: int = option(1, "Pictures per step (all from the same size bucket).", min=1, max=256)
    seed: int = option(0, "Seeds every random choice: the same seed and inputs give the same result.", min=0,
                       max=MAX_SEED, seed=True)
    run_name: str = option("run", "Name of the run folder under output/finetune (a counter is added when it "
                           "exists).")
    save_every: int = option(0, "Write a checkpoint every N steps (0 = only at the end; Cancel always writes one).",
                             min=0, max=1_000_000)
    validation_prompt: str = option("", "Sample this prompt every validation_every steps, at the training "
                                    "resolution; the pictures go to the run folder and the node's preview (empty = "
                                    "no validation).")
    validation_every: int = option(0, "Steps between validation samples (0 = none).", min=0, max=1_000_000)
    resume_run: str = option("", "Name of a run folder under output/finetune to continue from its last checkpoint "
                             "(empty = start a new run). Raise steps to train further.", record=False)
    optimizer: str = option("adamw", "The optimizer. adamw, adam, sgd, rmsprop: torch's. prodigy: finds its own step "
                            "size (learning_rate 1.0 = as found). adafactor: little memory. adamw8bit: 8-bit states "
                            "(bitsandbytes). schedulefree_adamw: no schedule needed (lr_scheduler constant). lion: "
                            "sign updates, use a 3-10x lower learning rate. The last four but adafactor need "
                            "pip install \"comfyui-finetune[optimizers]\".", choices="loop.optimizers:OPTIMIZERS")
    lr_scheduler: str = option("constant", "How the learning rate changes over the run (adafactor: Adafactor's own "
                               "relative-step schedule, with optimizer adafactor).", choices="loop.optimizers:LR_SCHEDULERS")
    warmup_steps: int = option(0, "Steps of linear learning-rate warm-up (schedulers with warm-up).", min=0,
                               max=100_000)
    grad_accum: int = option(1, "Micro-batches per optimizer step (a bigger effective batch at the same memory).",
                             min=1, max=1024)
    max_grad_norm: float = option(1.0, "Clip the gradient norm (0 = no clipping).", min=0.0, max=100.0, step=0.1)
    loss: str = option("mse", "Loss between prediction and target; huber is robust to outliers.", choices="loop.training:LOSSES")
    snr_gamma: float = option(5.0, "Min-SNR-gamma loss weighting: steadier, faster training (5 = the paper's value, "
                              "0 = off).", min=0.0, max=20.0, step=0.5)
    noise_offset: float = option(0.0, "Offset noise (0.05-0.1 helps very dark or bright pictures).", min=0.0,
                                 max=1.0)
    mixed_precision: str = option("auto", "Autocast on a GPU (auto = the model's own fp16 or bf16; an fp32 model: "
                                  "bf16 where the GPU has it, else fp16; fp16 comes with a grad scaler); trainable "
                                  "weights stay fp32. On the CPU an fp32 model trains in fp32, a bf16 model under "
                                  "bf16 autocast.", choices="loop.training:PRECISIONS")
    gradient_checkpointing: str = option(
        "auto", "Recompute activations in the backward pass instead of keeping them: much less memory, about a "
        "third slower. auto = on where the family needs it on a GPU (SDXL), off elsewhere; true / false from "
        "older workflows read as on / off.", choices=("auto", "on", "off"), legacy={True: "on", False: "off"})
    weight_decay: float = option(1e-2, "Weight decay of the optimizer (decoupled for AdamW).", min=0.0, max=1.0,
                                 step=1e-3)
    huber_delta: float = option(0.1, "Huber loss: where it turns from quadratic to linear.", min=1e-3, max=10.0,
                                step=0.01)
    validation_images: int = option(2, "Pictures per validation sample (seeds seed, seed + 1, ...).", min=1, max=16)
    channels_last: bool = option(False, "On a GPU: run the UNet in channels-last memory order (often faster "
                                 "convolutions under autocast; its convolution weights get a reordered copy).")
    torch_compile: bool = option(False, "On a GPU: compile the UNet with torch.compile (the first steps are slow while "
                                 "it compiles; faster after). Needs a working compiler toolchain.")

    def check_more(self) -> None:
        """Optimizer and schedule combinations that cannot work, named before any work."""
        if self.lr_scheduler == "adafactor" and self.optimizer != "adafactor":
            raise ValueError(f"lr_scheduler 'adafactor' is Adafactor's own schedule; with optimizer {self.optimizer!r} "
                             "choose another lr_scheduler, or optimizer adafactor")
        if self.optimizer == "schedulefree_adamw" and self.lr_scheduler != "constant":
            raise ValueError(f"optimizer schedulefree_adamw schedules itself: set lr_scheduler to constant (got "
                             f"{self.lr_scheduler!r}); its warm-up is warmup_steps")
        if self.optimizer == "prodigy" and 0 < self.learning_rate < 0.1:
            raise ValueError(f"optimizer prodigy finds its own step size: learning_rate is a multiplier of it, "
                             f"usually 1.0 (got {_fmt(self.learning_rate)}, which would barely train)")

    ema_decay: float = option(0.0, "Exponential moving average of the trained weights (0 = off; 0.999 is usual for "
                              "long runs, 0.99 for short ones): validation pictures and the result use the average.",
                              min=0.0, max=0.99999, step=0.001, round=False)
    ema_start: int = option(0, "Step from which the average starts (before it, it follows the weights).", min=0,
                            max=1_000_000)
    ema_every: int = option(1, "Update the average every N steps.", min=1, max=10_000)
    keep_best: str = option("off", "Keep the best checkpoint as the result: at every save point the validation "
                            "pictures are scored with CLIP (connect a CLIP scorer) against validation_prompt "
                            "(clip_t), the training pictures (clip_i) or both; off = the last step.",
                            choices="loop.validation:RANKINGS")
    early_stop_after: int = option(0, "With keep_best: stop after this many save points without a better score "
                                   "(0 = never).", min=0, max=10_000)
    validation_sampler: str = option(
        "auto", "Who draws the validation pictures. comfyui: ComfyUI's own KSampler path (the model as Model to "
        "ComfyUI gives it, the adapter patched in by ComfyUI's LoRA loading or an embedding read as "
        "embedding:<name>, CLIPTextEncode, ComfyUI's sampler and scheduler, VAE Decode), so a preview is the "
        "picture LoraLoader + KSampler + VAE Decode give at the same seed and settings; it holds one more copy of the "
        "model in ComfyUI's memory. pack: the pack's own DDIM sampler. auto: comfyui inside ComfyUI where it can "
        "(SD 1.x/2.x/XL; every training node: a ControlNet through Apply ControlNet (Advanced) on the run's condition), "
        "the pack's elsewhere; the log says which and why.",
        choices=VALIDATION_SAMPLERS)
    validation_sampler_name: str = option("euler", "ComfyUI's sampler for validation pictures, as KSampler's "
                                          "sampler_name (the pack's own sampler is DDIM).",
                                          choices=COMFY_SAMPLER_NAMES)
    validation_scheduler: str = option("normal", "ComfyUI's scheduler for validation pictures, as KSampler's "
                                       "scheduler.", choices=COMFY_SCHEDULERS)
    validation_steps: int = option(20, "Sampling steps of each validation picture (either sampler).", min=1,
                                   max=1000)
    validation_cfg: float = option(0.0, "Classifier-free guidance of the validation pictures (either sampler; "
                                   "negative prompt empty), as KSampler's cfg. 0 = auto: the model family's own, as "
                                   "the Sample node's cfg 0 (2 on the toy and the toy SDXL, 7.5 on SD 1.x).",
                                   min=0.0, max=100.0, step=0.1)
    unmasked_weight: float = option(0.0, "Pictures with a mask (alpha channel, name.mask.png, or a MASK input): the "
                                    "loss weight outside the mask (0 = only the masked part trains, 1 = the mask is "
                                    "ignored).", min=0.0, max=1.0, step=0.05)

    #: the loop's options as optional node inputs, in the order saved workflows hold them
    LOOP_OPTIONAL: ClassVar[tuple[str, ...]] = (
        "save_every", "validation_prompt", "validation_every", "resume_run", "optimizer", "lr_scheduler",
        "warmup_steps", "grad_accum", "max_grad_norm", "loss", "snr_gamma", "noise_offset", "mixed_precision",
        "gradient_checkpointing", "weight_decay", "huber_delta", "validation_images", "channels_last", "torch_compile",
        "ema_decay", "ema_start", "ema_every", "keep_best", "early_stop_after", "unmasked_weight")
    #: options added after the methods' own: each recipe lists them last, so saved workflows keep their order
    LATER: ClassVar[tuple[str, ...]] = ("validation_sampler", "validation_sampler_name", "validation_scheduler",
                                        "validation_steps", "validation_cfg")
    #: the loop's options a first run leaves alone: ComfyUI's front end folds them away (the node's "Show Advanced"
    #: toggle) and keeps their values; validation_prompt / validation_every and resume_run stay in view
    advanced: ClassVar[tuple[str, ...]] = tuple(n for n in LOOP_OPTIONAL if n not in (
        "validation_prompt", "validation_every", "resume_run")) + LATER
    required = ("steps", "learning_rate", "batch_size", "seed", "run_name")
    optional = LOOP_OPTIONAL + LATER


# --------------------------------------------------------------------------------------------- methods --
@dataclass
class LoRARecipe(TrainConfig):
    """LoRA: low-rank adapters on the UNet (and optionally the text encoder)."""

    method: ClassVar[str] = "lora"
    learning_rate: float = like(TrainConfig, "learning_rate", help="Peak learning rate. 0 = auto: 1e-4 on SD 1.x, "
                                "2.x and SDXL, 1e-3 on the toys; x4 for lokr, /3 with lion, 1.0 with prodigy (the log "
                                "and config.json say which). Type a number to set it yourself.")
    seed: int = like(TrainConfig, "seed", help="Seeds noise, timesteps, data order and dropout: same inputs, same "
                     "LoRA.")
    run_name: str = like(TrainConfig, "run_name", "lora")
    rank: int = option(8, "LoRA rank: the adapter's capacity (4-32 is usual).", min=1, max=256)
    alpha: float = option(8.0, "LoRA alpha: the update is scaled by alpha / rank (alpha = rank keeps it at 1).",
                          min=0.01, max=1024.0, step=0.5)
    target_modules: str = option("auto", "Which layers get adapters: attention only (small, the usual choice on "
                                 "SD), + feed-forward, + convolutions (LoCon, most capacity). auto: attention on SD "
                                 "1.x, 2.x and SDXL, attention+feedforward+conv on the toys (the log and config.json "
                                 "say which).", choices="methods.lora:TARGET_CHOICES")
    train_text_encoder: bool = option(False, "Also adapt the text encoder's attention (stronger binding of the "
                                      "token, more drift).")
    text_encoder_lr: float = option(0.0, "Learning rate of the text encoder (0 = same as learning_rate).", min=0.0,
                                    max=1.0, step=1e-5, round=False)
    adapter: str = option("lora", "The adapter's kind. lora: low-rank up @ down, the usual choice. loha (LyCORIS): "
                          "the Hadamard product of two low-rank pairs, more capacity at the same rank and size. lokr "
                          "(LyCORIS): a Kronecker product, the smallest files, good for styles. dora: a LoRA plus a "
                          "learned magnitude per input channel (DoRA), closer to a full fine-tune at the same rank, "
                          "~1.2x the step time on the toy. Each saves a file ComfyUI's LoraLoader, A1111/Forge "
                          "and LyCORIS read.", choices="adapters.kinds:KINDS")

    required = ("steps", "learning_rate", "batch_size", "rank", "alpha", "seed", "target_modules",
                "train_text_encoder", "text_encoder_lr", "run_name")
    optional = TrainConfig.LOOP_OPTIONAL + ("adapter",) + TrainConfig.LATER
    advanced = TrainConfig.advanced + ("text_encoder_lr",)
    shape = ("rank", "target_modules", "train_text_encoder", "adapter")


@dataclass
class TextualInversionRecipe(TrainConfig):
    """Textual Inversion: a new word's embedding vectors, nothing else."""

    method: ClassVar[str] = "textual_inversion"
    token: str = option("<my-concept>", "The new word to learn; it must not exist yet (use brackets, e.g. "
                        "<my-cat>).")
    init_token: str = option("object", "The known word whose embedding the new word starts from (e.g. cat, star, "
                             "painting), or several words, one per vector ('blue star' with num_vectors 2): vector "
                             "k starts from word k, cycling.")
    num_vectors: int = option(1, "Embedding vectors for the word: more can hold more detail, but take prompt space "
                              "and learn slower.", min=1, max=32)
    steps: int = like(TrainConfig, "steps", 1000)
    learning_rate: float = like(TrainConfig, "learning_rate", help="Peak learning rate. 0 = auto: 5e-3 on SD 1.x, "
                                "2.x and SDXL, 0.02 on the toys (the log and config.json say which). Type a number "
                                "to set it yourself (1e-3 to 1e-2 is usual).", step=1e-4)
    seed: int = like(TrainConfig, "seed", help="Seeds noise, timesteps, data order and templates: same inputs, same "
                     "embedding.")
    caption_mode: str = option("dataset captions", "Captions to train with: the dataset's own (they must contain the "
                               "token), or random object / style templates with the token.",
                               choices="methods.textual_inversion:CAPTION_MODES")
    run_name: str = like(TrainConfig, "run_name", "textual_inversion")

    required = ("token", "init_token", "num_vectors", "steps", "learning_rate", "batch_size", "seed", "caption_mode",
                "run_name")
    optional = TrainConfig.LOOP_OPTIONAL + TrainConfig.LATER
    shape = ("token", "num_vectors")

    def check_more(self) -> None:
        super().check_more()
        if not self.token.strip():
            raise ValueError("token is empty: give the new word, e.g. <my-cat>")


@dataclass
class DreamBoothRecipe(TrainConfig):
    """DreamBooth: a rare identifier bound to a subject, as a LoRA or a full fine-tune, with prior preservation."""

    method: ClassVar[str] = "dreambooth"
    instance_prompt: str = option("a sks dog", "Prompt with the rare identifier for the instance pictures.")
    class_prompt: str = option("a dog", "Prompt of the subject's class (for prior preservation).")
    prior_preservation: bool = option(True, "Also train on class pictures so the class word keeps its meaning (less "
                                      "language drift). It needs enough steps: the class pictures' pull catches up "
                                      "with the subject's (on the toy, 200 steps left some drift, 400 none).")
    prior_loss_weight: float = option(1.0, "Lambda: weight of the class loss (higher: the class kept closer, the "
                                      "subject learnt slower; more steps do more for the drift).", min=0.0,
                                      max=100.0, step=0.05)
    num_class_images: int = option(100, "Class pictures per subject (generated if missing).", min=1, max=100_000)
    mode: str = option("lora", "lora: a small adapter; full: every UNet weight (strongest, largest).",
                       choices="methods.dreambooth:MODES")
    train_text_encoder: bool = option(False, "Also train the text encoder (LoRA or full).")
    steps: int = like(TrainConfig, "steps", 0, "Optimizer steps of the whole run (counting steps done before a "
                      "resume). 0 = auto: the family's steps per subject times the subjects, so each trains as long "
                      "as it would alone (400 each on SD 1.x, 2.x, SDXL, Z-Image and the toy audio model, 800 on the "
                      "toy, the toy SDXL and the toy Z-Image, whose full mode takes 400; the log and config.json say "
                      "which). A typed number is the whole run's: "
                      "N subjects share it, each drawn in about steps / N.", min=0)
    learning_rate: float = like(TrainConfig, "learning_rate", help="Peak learning rate. 0 = auto: lora mode 1e-4 on "
                                "SD 1.x, 2.x, SDXL and Z-Image, 2e-3 on the toy, the toy SDXL and the toy Z-Image "
                                "(1e-3 on the toy audio model); full mode 5e-6 on SD, 4e-4 on the toy and the toy "
                                "SDXL (2e-4 on the other toys; the log and config.json say which). Type a number to "
                                "set it yourself.",
                                step=1e-6)
    batch_size: int = like(TrainConfig, "batch_size", 0, help="Instance pictures per step (as many class pictures "
                           "are added). 0 = auto: 4 on the toy Z-Image in lora mode, 1 everywhere else (the log and "
                           "config.json say which).", min=0)
    seed: int = like(TrainConfig, "seed", help="Seeds training and class-picture generation.")
    run_name: str = like(TrainConfig, "run_name", "dreambooth")
    rank: int = like(LoRARecipe, "rank", help="LoRA rank (lora mode).")
    alpha: float = like(LoRARecipe, "alpha", help="LoRA alpha (lora mode).")
    target_modules: str = like(LoRARecipe, "target_modules", help="Layers with adapters (lora mode). auto: "
                               "attention+feedforward on SD 1.x, 2.x and SDXL, attention+feedforward+conv on the toys "
                               "(the log and config.json say which).")
    pivotal_tuning: bool = option(False, "lora mode: also learn an embedding for the identifier (Textual Inversion + "
                                  "LoRA). The identifier must be a new word, e.g. 'a <sks> dog'; it starts from the "
                                  "class prompt's last word.")
    embedding_lr: float = option(5e-3, "Learning rate of the pivotal embedding (0 = learning_rate).", min=0.0,
                                 max=1.0, step=1e-4, round=False)

    required = ("instance_prompt", "class_prompt", "prior_preservation", "prior_loss_weight", "num_class_images",
                "mode", "train_text_encoder", "steps", "learning_rate", "batch_size", "seed", "run_name")
    adapter: str = like(LoRARecipe, "adapter", help="lora mode: the adapter's kind (lora, loha, lokr or dora).")

    optional = ("rank", "alpha", "target_modules", "pivotal_tuning", "embedding_lr") + TrainConfig.LOOP_OPTIONAL + (
        "adapter",) + TrainConfig.LATER
    advanced = TrainConfig.advanced + ("embedding_lr",)
    shape = ("mode", "train_text_encoder", "rank", "target_modules", "pivotal_tuning", "adapter")

    def check_more(self) -> None:
        super().check_more()
        if self.pivotal_tuning and self.mode != "lora":
            raise ValueError("pivotal_tuning needs mode 'lora' (a full fine-tune has no separate adapter)")


@dataclass
class ControlNetRecipe(TrainConfig):
    """ControlNet: a trainable copy of the UNet's encoder that learns to follow a condition image."""

    method: ClassVar[str] = "controlnet"
    preprocessor: str = option("canny", "Makes each training picture's condition on the fly (ignored when a "
                               "conditions dataset is connected).", choices="data.preprocess:PREPROCESSORS")
    steps: int = like(TrainConfig, "steps", 1000)
    learning_rate: float = like(TrainConfig, "learning_rate", help="Peak learning rate. 0 = auto: 1e-5 on SD 1.x, "
                                "2.x and SDXL, 1e-3 on the toys (the log and config.json say which). Type a number "
                                "to set it yourself.", step=1e-6)
    batch_size: int = like(TrainConfig, "batch_size", 4)
    seed: int = like(TrainConfig, "seed", help="Seeds noise, timesteps, data order and caption dropout: same inputs, "
                     "same result.")
    caption_dropout: float = option(0.5, "Share of steps whose caption is dropped, so the ControlNet learns to follow "
                                    "the condition alone (the paper drops half).", min=0.0, max=0.99, step=0.05)
    run_name: str = like(TrainConfig, "run_name", "controlnet")
    low_threshold: float = option(0.4, "Canny: weak-edge threshold (toy pictures: 0.1).", min=0.01, max=0.99)
    high_threshold: float = option(0.8, "Canny: strong-edge threshold (toy pictures: 0.2).", min=0.01, max=0.99)

    required = ("preprocessor", "steps", "learning_rate", "batch_size", "seed", "caption_dropout", "run_name")
    optional = ("low_threshold", "high_threshold") + TrainConfig.LOOP_OPTIONAL + TrainConfig.LATER

    def check_more(self) -> None:
        super().check_more()
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold {self.low_threshold} must not exceed high_threshold "
                             f"{self.high_threshold}")

    def preprocessor_options(self) -> dict:
        return {"low_threshold": self.low_threshold, "high_threshold": self.high_threshold} \
            if self.preprocessor == "canny" else {}


# --------------------------------------------------------------------------------------------- the table --
@dataclass(frozen=True)
class MethodEntry:
    """One training method, declared once: its recipe (which names it, ``recipe.method``), its train function as
    ``"module:function"`` of the library (imported on first use, so the table loads no torch) and its label (how
    nodes, errors and run listings name it to people). Training nodes name their entry (``METHOD = "lora"``); the
    shell and config.json find it by the recorded method."""

    recipe: type[TrainConfig]
    train_function: str
    label: str

    @property
    def name(self) -> str:
        return self.recipe.method

    @property
    def train(self) -> Callable:
        """``train_<method>(recipe, model, data, run, callbacks=None, shard=SINGLE, **kw) -> TrainResult``."""
        return library_object(self.train_function)


#: every training method, by the name config.json records
METHODS: dict[str, MethodEntry] = {m.name: m for m in (
    MethodEntry(LoRARecipe, "methods.lora:train_lora", "LoRA"),
    MethodEntry(TextualInversionRecipe, "methods.textual_inversion:train_textual_inversion", "Textual Inversion"),
    MethodEntry(DreamBoothRecipe, "methods.dreambooth:train_dreambooth", "DreamBooth"),
    MethodEntry(ControlNetRecipe, "methods.controlnet:train_controlnet", "ControlNet"))}


def label_of(method: str) -> str:
    """How people see a method's name (``textual_inversion``: Textual Inversion); an unknown name as it is."""
    return METHODS[method].label if method in METHODS else method


# ------------------------------------------------------------------------------------------- config.json --
def run_config(recipe: TrainConfig, model_identity: dict, dataset: dict, **extra) -> dict:
    """The whole of a run's config.json: enough to repeat the run (``python -m comfyui_finetune train``)."""
    return {"format": CONFIG_FORMAT, "pack": {"name": "comfyui-finetune", "version": PACK_VERSION},
            "method": recipe.method, "recipe": recipe.to_dict(), "model": model_identity, "dataset": dataset,
            **extra}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".") if p.isdigit())


def read_config(config: dict | str | Path, method: str | None = None) -> tuple[TrainConfig, dict]:
    """A config.json (or its parsed dict) back into its typed recipe; returns ``(recipe, config)``.

    ``method`` is what the caller expects: a config of another method is an error naming both."""
    where = "config.json"
    if not isinstance(config, dict):
        where = str(config)
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} does not exist: give a run's config.json "
                                    "(output/finetune/<run>/config.json)") from None
        except ValueError as e:
            raise ValueError(f"{where} is not valid JSON ({e})") from None
    fmt = config.get("format")
    if fmt is None or "recipe" not in config:
        raise ValueError(f"{where}: format is missing: this config was written by a pack older than 0.1.0's recipes "
                         "and cannot be read back; train again from the graph")
    if not isinstance(fmt, int) or fmt > CONFIG_FORMAT:
        raise ValueError(f"{where}: format {fmt!r} is newer than this pack reads ({CONFIG_FORMAT}); update "
                         "comfyui-finetune")
    version = (config.get("pack") or {}).get("version", "")
    if _version_tuple(version) > _version_tuple(PACK_VERSION):
        raise ValueError(f"{where}: pack.version {version} is newer than this pack ({PACK_VERSION}); update "
                         "comfyui-finetune to read it")
    name = config.get("method")
    if name not in METHODS:
        raise ValueError(f"{where}: method {name!r} is not known; known methods: {', '.join(METHODS)}")
    if method is not None and name != method:
        raise ValueError(f"{where}: method is {name!r}, not {method!r}: this run was trained with the {name} node")
    return METHODS[name].recipe.from_dict(config["recipe"], where=f"{where}: recipe"), config
