"""finetune/train: the training nodes. Each is thin: it names its method (``METHOD``, an entry of
trainers.config.recipes.METHODS), whose recipe gives its inputs; it builds the recipe, calls the method's train function
in trainers/, and converts the result.
Progress, events, previews and Cancel are wired to ComfyUI here (or to the fallback outside it)."""
from __future__ import annotations

import re
import time

from . import comfy_preview, host, load_check
from .base import HIDDEN, LINK, ROOT_CATEGORY, STRING, checked, recipe_inputs, torch_call

CATEGORY = f"{ROOT_CATEGORY}/train"
MODEL = LINK("FT_MODEL", "The base model to adapt (not changed: training shares its frozen weights and copies "
                         "only what trains).")
DATASET = LINK("FT_DATASET", "Captioned pictures of the concept.")
SCORER_TIP = ("With keep_best: the CLIP model that scores each save point's validation pictures (Load CLIP Scorer); "
              "the best-scoring checkpoint becomes the result.")
SCORER = {"scorer": LINK("FT_CLIP_SCORER", SCORER_TIP)}
#: class pictures the base draws wrong teach prior preservation a wrong class, and it pulls the subject toward it:
#: the toy never drew a cross, and its "a cross" pictures are squares and circles (0 of 32 crosses); crosses trained
#: beside them reached 0.62-0.78, beside 100 given crosses 0.84-0.97 (benchmarks/bench_concepts.py, README)
CLASS_DATASET_TIP = ("Your own class pictures (missing ones are generated from the base model). Give them when the "
                     "base model does not draw the class well: prior preservation learns the class from these, and "
                     "pulls the subject toward what they show.")
_COMMON = ("Progress shows on the node; Cancel writes a checkpoint first, and resume_run continues it. Each run keeps "
           "its config, dataset, log, checkpoints and samples in output/finetune/<run>; "
           "`python -m comfyui_finetune train output/finetune/<run>/config.json` repeats it from the shell.")


#: events per second at most while a run trains (each carries every step since the last one, so none is lost)
EVENTS_PER_S = 4
#: the most chart points a node's ui output keeps (a long run is thinned evenly; the first and last step stay)
CHART_POINTS = 400
#: a validation picture in a run's samples/: step-<step>-<index>.png
SAMPLE = re.compile(r"step-(\d+)-(\d+)\.png")


class ComfyCallbacks:
    """The loop's callbacks, wired to ComfyUI: a progress bar, throttled ``finetune.progress`` events (each with the
    steps since the previous one), preview events and images, and Cancel."""

    def __init__(self, run, steps: int, label: str):
        self.run, self.t0, self.last, self.pending = run, time.time(), 0.0, []
        self.first_step: int | None = None
        self.bar = host.Progress(steps, desc=f"{label} {run.name}")

    def loop_callbacks(self):
        from ..trainers.loop.training import Callbacks as LoopCallbacks

        return LoopCallbacks(on_step=self.on_step, should_stop=host.interrupted, on_preview=self.on_preview,
                             on_score=self.on_score)

    def on_step(self, info) -> None:
        now = time.time()
        if self.first_step is None:
            self.first_step = info.step - 1  # a resumed run starts its clock at the step it resumed from
        self.pending.append([info.step, info.loss, info.lr])
        if now - self.last >= 1.0 / EVENTS_PER_S or info.step == info.total:
            self.last = now
            rate = (info.step - self.first_step) / max(now - self.t0, 1e-6)
            host.send_event("finetune.progress", {
                "run": self.run.name, "step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr,
                "it_per_s": round(rate, 3), "eta_s": round((info.total - info.step) / max(rate, 1e-9), 1),
                "points": self.pending})
            self.pending = []
        if not host.interrupted():  # ComfyUI's bar raises on Cancel; the loop checks should_stop itself
            self.bar.update(info.step, total=info.total)  # the total known once auto steps resolve

    def on_score(self, step: int, scores: dict, best_step: int) -> None:
        host.send_event("finetune.score", {"run": self.run.name, "step": step, **scores, "best_step": best_step})

    def on_preview(self, step: int, images) -> None:
        from ..trainers.eval.grids import to_pil

        host.send_event("finetune.preview", {"run": self.run.name, "step": step,
                                             "images": [f"samples/step-{step}-{i}.png" for i in range(len(images))]})
        if host.in_comfyui() and not host.interrupted():
            self.bar.update(step, preview=("PNG", to_pil(images[0]), 256))


def train_in_comfyui(train_fn, recipe, model, data, **kw):
    """Run ``train_fn(recipe, model, data, run, callbacks, **kw)`` in a run folder under output/finetune, with
    ComfyUI's progress, events and Cancel. On Cancel the checkpoint is written, then the interrupt is raised."""
    from ..trainers.runs.run_dir import open_run

    root = host.output_dir() / "finetune"
    resume = recipe.resume_run.strip()
    if resume:
        host.inside(root, resume, "resume_run")
    run = open_run(root, host.safe_relative(recipe.run_name.strip() or recipe.method, "run_name").name, resume,
                   default=recipe.method)
    cb = ComfyCallbacks(run, recipe.steps, recipe.method)
    callbacks = cb.loop_callbacks()
    callbacks.draw = preview = comfy_preview.drawer(model, recipe)  # ComfyUI's own sampler, where it can
    host.hand_over_gpu(model.device)
    try:
        trained = train_fn(recipe, model, data, run, callbacks, **kw)
    except BaseException:  # ComfyUI's interrupt is a BaseException from 0.1x on
        if not resume and not any(run.path.iterdir()):  # refused before anything was written: leave no trace
            run.path.rmdir()
        raise
    finally:
        cb.bar.close()
        if preview is not None:
            preview.close()
        host.give_back_gpu(model.device)
    if trained.cancelled:
        msg = f"cancelled at step {trained.step}; resume with resume_run='{run.name}'"
        host.log.info("%s (checkpoint written)", msg)
        host.raise_if_interrupted(msg)
        raise host.Interrupted(msg)
    return trained


def chart_ui(log, limit: int = CHART_POINTS) -> dict:
    """A training node's ``ui`` output: the loss history (at most ``limit`` points) for the node's chart, so the chart
    comes back from the queue history and a reopened workflow, and the run's last validation pictures."""
    rows = log.rows
    keep = rows if len(rows) <= limit else [rows[round(i * (len(rows) - 1) / (limit - 1))] for i in range(limit)]
    total = int((log.config.get("recipe") or {}).get("steps", log.steps))
    chart = {"run": log.run, "step": log.steps, "total": total, "seconds": log.seconds,
             "points": [[r["step"], r["loss"], r.get("lr", 0.0)] for r in keep],
             "scores": [[r["step"], r["score"], r.get("clip_t"), r.get("clip_i")] for r in rows if "score" in r],
             "best_step": log.best_step}
    samples = host.output_dir() / "finetune" / log.run / "samples"
    found = [(int(m[1]), int(m[2]), p.name) for p in (samples.glob("*.png") if samples.is_dir() else [])
             if (m := SAMPLE.fullmatch(p.name))]
    last = max((step for step, _, _ in found), default=None)
    images = [{"filename": name, "subfolder": f"finetune/{log.run}/samples", "type": "output"}
              for step, _, name in sorted(found) if step == last]
    return {"finetune_chart": [chart], "images": images}


class Trainer:
    """Base of the training nodes. ``METHOD`` names the node's entry of trainers.config.recipes.METHODS: its recipe
    gives the inputs after the node's links (``LINKS``, ``OPTIONAL_LINKS``) and :meth:`recipe_from` builds it, and
    its train function trains. ``execute`` returns the outputs (what Python callers use); ComfyUI calls ``train``,
    which adds the node's ``ui``: the chart's loss history and the last validation pictures."""

    FUNCTION = "train"
    METHOD: str = ""
    LINKS: dict = {}
    OPTIONAL_LINKS: dict = SCORER

    @classmethod
    def entry(cls):
        """The node's method: its recipe, train function and label."""
        from ..trainers.config.recipes import METHODS

        return METHODS[cls.METHOD]

    @classmethod
    def INPUT_TYPES(cls):
        return recipe_inputs(cls.entry().recipe, cls.LINKS, cls.OPTIONAL_LINKS, hidden=HIDDEN)

    @classmethod
    def recipe_from(cls, args: tuple, inputs: dict):
        """The node's widget values as the method's recipe (range and choice errors name the input). ComfyUI passes
        them by name; a Python caller may pass the required ones by position, in the node's order."""
        recipe_cls = cls.entry().recipe
        if len(args) > len(recipe_cls.required):
            raise TypeError(f"{len(args)} positional values, but the node has {len(recipe_cls.required)} required "
                            f"inputs after its links ({', '.join(recipe_cls.required)})")
        given = dict(zip(recipe_cls.required, args))
        twice = sorted(set(given) & set(inputs))
        if twice:
            raise TypeError(f"{', '.join(twice)} given both by position and by name")
        return recipe_cls(**{k: v for k, v in {**given, **inputs}.items() if k in recipe_cls.options()})

    def run_method(self, recipe, model, data, **kw):
        """:func:`train_in_comfyui` with the node's train function."""
        return train_in_comfyui(self.entry().train, recipe, model, data, **kw)

    @classmethod
    def VALIDATE_INPUTS(cls, gradient_checkpointing="auto"):
        """gradient_checkpointing was a switch (true / false) before it became a combo (auto / on / off): ComfyUI
        refuses a combo value that is not in the list, so the recipe checks this input in its place and saved
        workflows keep working (true reads as on, false as off)."""
        from ..trainers.config.recipes import TrainConfig

        return TrainConfig.problem("gradient_checkpointing", gradient_checkpointing) or True

    def train(self, *args, **kwargs):
        out = self.execute(*args, **kwargs)
        log = out[self.RETURN_TYPES.index("FT_TRAINING_LOG")]
        check_results(out, host.output_dir() / "finetune" / log.run)
        return {"ui": chart_ui(log), "result": out}


def check_results(out: tuple, folder) -> list:
    """The result files a run folder keeps (``lora``, ``embedding``, ``controlnet.safetensors``), read back as
    the save nodes' files are (:mod:`.load_check`: by ComfyUI's loaders inside ComfyUI)."""
    from ..trainers.adapters.controlnet.value import ControlNet
    from ..trainers.methods.lora import LoRA
    from ..trainers.methods.textual_inversion import Embedding

    checks = {LoRA: ("lora", lambda p, v: load_check.check_lora(p, v)),
              Embedding: ("embedding", lambda p, v: load_check.check_embedding(p, folder, v)),
              ControlNet: ("controlnet", lambda p, v: load_check.check_controlnet(p, v, "original", "fp16"))}
    done = []
    for value in out:
        stem, check = checks.get(type(value), (None, None))
        if stem and (folder / f"{stem}.safetensors").is_file():
            done.append(check(folder / f"{stem}.safetensors", value))
    return done


class FT_TrainLoRA(Trainer):
    METHOD = "lora"
    DESCRIPTION = ("Train a LoRA (low-rank adapter, through peft; or LyCORIS LoHa / LoKr, or DoRA, with the adapter "
                   "option) on a captioned dataset. Outputs the model with the LoRA applied, the LoRA itself (save it "
                   "with Save LoRA) and the training log. Z-Image: train on Base and apply the LoRA to Turbo "
                   "(Turbo is distilled to draw in 8 steps; training on it undoes that). " + _COMMON)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL", "FT_LORA", "FT_TRAINING_LOG")
    RETURN_NAMES = ("model", "lora", "log")
    OUTPUT_TOOLTIPS = ("The base model with the trained LoRA applied (sharing the base's weights), ready for Sample.",
                       "The LoRA: connect Save LoRA to write it to models/loras, or Apply LoRA.",
                       "Loss per step, learning rate, timings and config: connect Loss Plot.")
    LINKS = {"model": MODEL, "dataset": DATASET}

    @torch_call
    def execute(self, model, dataset, *args, **inputs):
        t = self.run_method(self.recipe_from(args, inputs), model, dataset, scorer=inputs.get("scorer"))
        return (t.model, t.result, t.training_log)


class FT_TrainTextualInversion(Trainer):
    METHOD = "textual_inversion"
    DESCRIPTION = ("Textual Inversion: teach the model a new word (e.g. <my-cat>) from pictures, by learning only that "
                   "word's embedding vectors; every other weight stays exactly as it was. Outputs the model with the "
                   "word added, the embedding (save it with Save Embedding: ComfyUI's embedding:name, A1111 and "
                   "diffusers read it) and the training log. " + _COMMON)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL", "FT_EMBEDDING", "FT_TRAINING_LOG")
    RETURN_NAMES = ("model", "embedding", "log")
    OUTPUT_TOOLTIPS = ("The model with the new word added, ready for Sample.",
                       "The learned vectors: connect Save Embedding or Apply Embedding.",
                       "Loss per step, learning rate, timings and config.")
    LINKS = {"model": MODEL, "dataset": LINK("FT_DATASET", "Pictures of the concept.")}

    @torch_call
    def execute(self, model, dataset, *args, **inputs):
        t = self.run_method(self.recipe_from(args, inputs), model, dataset, scorer=inputs.get("scorer"))
        return (t.model, t.result, t.training_log)


class FT_DreamBoothSubject:
    DESCRIPTION = ("One DreamBooth subject: its pictures, its instance prompt with a rare identifier ('a sks dog') "
                   "and its class prompt ('a dog'). Chain several (previous input) to train them together, each with "
                   "its own identifier and class pictures.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("This subject after the previous ones: connect to Train DreamBooth's subjects input.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": LINK("FT_DATASET", "Pictures of this subject."),
                "instance_prompt": STRING("a sks dog", "The prompt with the subject's rare identifier."),
                "class_prompt": STRING("a dog", "The prompt of its class, for prior preservation."),
            },
            "optional": {
                "previous": LINK("FT_SUBJECTS", "Subjects chained before this one."),
                "class_dataset": LINK("FT_DATASET", CLASS_DATASET_TIP),
            },
        }

    @checked
    def execute(self, dataset, instance_prompt, class_prompt, previous=None, class_dataset=None):
        from ..trainers.methods.dreambooth import Subject

        return (list(previous or []) + [Subject(dataset, instance_prompt.strip(), class_prompt.strip(),
                                                class_dataset)],)


class FT_TrainDreamBooth(Trainer):
    METHOD = "dreambooth"
    DESCRIPTION = ("DreamBooth: bind a rare identifier ('a sks dog') to a subject from a few pictures, as a LoRA or a "
                   "full fine-tune. With prior preservation each step also trains on class pictures ('a dog'), which "
                   "are generated from the base model when not given (and cached), so the class keeps its meaning. "
                   "Several subjects: chain DreamBooth Subject nodes into subjects. The output model is a valid "
                   "model input of another training node (two stages). " + _COMMON)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL", "FT_LORA", "FT_TRAINING_LOG", "FT_EMBEDDING")
    RETURN_NAMES = ("model", "lora", "log", "embedding")
    OUTPUT_TOOLTIPS = ("The tuned model, ready for Sample or another training stage.",
                       "The LoRA (lora mode; in full mode the weights are in the model output).",
                       "Loss per step, learning rate, timings and config.",
                       "With pivotal tuning: the identifier's embedding; save it beside the LoRA with Save "
                       "Embedding (ComfyUI and A1111 then load both).")
    LINKS = {"model": MODEL,
             "dataset": LINK("FT_DATASET", "The instance pictures (ignored when subjects is connected).")}
    OPTIONAL_LINKS = {"class_dataset": LINK("FT_DATASET", CLASS_DATASET_TIP),
                      "subjects": LINK("FT_SUBJECTS", "Several subjects from chained DreamBooth Subject nodes."),
                      "scorer": LINK("FT_CLIP_SCORER", SCORER_TIP + " With prior preservation it also checks, "
                                     "before training, that the class pictures look like the class prompt at least "
                                     "half as much as the subject's pictures do, and warns when they do not.")}

    @torch_call
    def execute(self, model, dataset, *args, class_dataset=None, subjects=None, **inputs):
        from ..trainers.methods.dreambooth import Subject

        recipe = self.recipe_from(args, inputs)
        subs = list(subjects) if subjects else [Subject(dataset, recipe.instance_prompt.strip(),
                                                        recipe.class_prompt.strip(), class_dataset)]
        t = self.run_method(recipe, model, subs, class_cache=host.output_dir() / "finetune" / "class_images",
                            progress=host.Progress, scorer=inputs.get("scorer"))
        return (t.model, t.result, t.training_log, t.extra.get("embedding"))


class FT_TrainControlNet(Trainer):
    METHOD = "controlnet"
    DESCRIPTION = ("Train a ControlNet for a model: it starts as a copy of the model's UNet encoder with zero output "
                   "convolutions (so it changes nothing at first) and learns to make the picture follow a condition. "
                   "The condition of each training picture is made on the fly by the chosen preprocessor, or taken "
                   "from a conditions dataset paired by file name. Only the ControlNet trains. Outputs the "
                   "ControlNet (Apply ControlNet, Save ControlNet) and the training log. " + _COMMON)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_CONTROLNET", "FT_TRAINING_LOG")
    RETURN_NAMES = ("control_net", "log")
    OUTPUT_TOOLTIPS = ("The trained ControlNet: connect Apply ControlNet or Save ControlNet.",
                       "Loss per step, learning rate, timings and config: connect Loss Plot.")
    LINKS = {"model": LINK("FT_MODEL", "The base model the ControlNet is for (it stays frozen)."),
             "dataset": LINK("FT_DATASET", "Captioned training pictures; vary position and size, since the "
                             "condition is what should carry the layout.")}
    OPTIONAL_LINKS = {"conditions": LINK("FT_DATASET", "Condition images paired with the training pictures by file "
                                         "name (any extension), instead of the preprocessor: load their folder with "
                                         "Load Image Dataset (its caption is not used; put any, e.g. 'condition')."),
                      "control_net": LINK("FT_CONTROLNET", "Continue training this ControlNet instead of starting "
                                          "from the UNet."), **SCORER}

    @torch_call
    def execute(self, model, dataset, *args, conditions=None, control_net=None, **inputs):
        from ..trainers.data.dataset import pair_conditions

        recipe = self.recipe_from(args, inputs)
        if conditions is not None:
            dataset = pair_conditions(dataset, conditions)
        t = self.run_method(recipe, model, dataset, init=control_net, scorer=inputs.get("scorer"))
        return (t.result, t.training_log)
