"""finetune/train: the training nodes. Each is a thin face over trainers.loop.train with its method."""
from __future__ import annotations

import json
import time

from . import host
from .base import BOOLEAN, COMBO, FLOAT, HIDDEN, INT, LINK, ROOT_CATEGORY, SEED, STRING, torch_call

CATEGORY = f"{ROOT_CATEGORY}/train"
OPTIMIZER_NAMES = ["adamw", "adam", "sgd", "rmsprop"]  # == trainers.loop.OPTIMIZERS (tested)
LR_SCHEDULER_NAMES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
LORA_TARGETS = ["attention", "attention+feedforward", "attention+feedforward+conv"]  # == trainers.lora.TARGETS

#: the shared loop's options, as optional inputs of every training node
LOOP_OPTIONS = {
    "save_every": INT(0, 0, 1_000_000, "Write a checkpoint every N steps (0 = only at the end; Cancel always "
                      "writes one)."),
    "validation_prompt": STRING("", "Sample this prompt every validation_every steps; the pictures go to the "
                                "run folder and the node's preview (empty = no validation)."),
    "validation_every": INT(0, 0, 1_000_000, "Steps between validation samples (0 = none)."),
    "resume_run": STRING("", "Name of a run folder under output/finetune to continue from its last checkpoint "
                         "(empty = start a new run). Raise steps to train further."),
    "optimizer": COMBO(OPTIMIZER_NAMES, "The optimizer."),
    "lr_scheduler": COMBO(LR_SCHEDULER_NAMES, "How the learning rate changes over the run."),
    "warmup_steps": INT(0, 0, 100_000, "Steps of linear learning-rate warm-up (schedulers with warm-up)."),
    "grad_accum": INT(1, 1, 1024, "Micro-batches per optimizer step (a bigger effective batch at the same "
                      "memory)."),
    "max_grad_norm": FLOAT(1.0, 0.0, 100.0, "Clip the gradient norm (0 = no clipping).", step=0.1),
    "loss": COMBO(["mse", "huber"], "Loss between prediction and target; huber is robust to outliers."),
    "snr_gamma": FLOAT(5.0, 0.0, 20.0, "Min-SNR-gamma loss weighting: steadier, faster training (5 = the "
                       "paper's value, 0 = off).",
                       step=0.5),
    "noise_offset": FLOAT(0.0, 0.0, 1.0, "Offset noise (0.05-0.1 helps very dark or bright pictures)."),
    "mixed_precision": COMBO(["auto", "no", "fp16", "bf16"], "Autocast on a GPU (auto = bf16 where supported); "
                             "the CPU always trains in fp32."),
    "gradient_checkpointing": BOOLEAN(False, "Save memory on large models at some speed cost."),
}


def loop_config(steps, learning_rate, batch_size, seed, **opt):
    from ..trainers.loop import TrainConfig

    keys = ("save_every", "validation_prompt", "validation_every", "optimizer", "lr_scheduler", "warmup_steps",
            "grad_accum", "max_grad_norm", "loss", "snr_gamma", "noise_offset", "mixed_precision",
            "gradient_checkpointing")
    return TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                       **{k: opt[k] for k in keys if k in opt})


def run_training(model, dataset, method, cfg, run_name: str, resume_run: str = "", extra_config=None):
    """Train on a copy of ``model`` with progress, events and Cancel wired to ComfyUI (or the fallback).

    Returns the loop's TrainResult. On Cancel a checkpoint is written first, then the interrupt is raised.
    """
    from ..trainers.loop import Callbacks, RunDir, train

    root = host.output_dir() / "finetune"
    if resume_run.strip():
        rel = host.safe_relative(resume_run.strip(), "resume_run")
        if not (root / rel).is_dir():
            runs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"resume_run {resume_run!r} is not a run folder under output/finetune "
                                    f"(runs there: {', '.join(runs[-8:]) or 'none'})")
        run = RunDir(root / rel)
    else:
        run = RunDir.create(root, host.safe_relative(run_name.strip() or method.name, "run_name").name)
    bar = host.Progress(cfg.steps, desc=f"{method.name} {run.path.name}")
    last_event = [0.0]
    t0 = time.time()

    def on_step(info):
        now = time.time()
        if now - last_event[0] > 0.25 or info.step == info.total:
            last_event[0] = now
            host.send_event("finetune.progress", {"run": run.path.name, "step": info.step, "total": info.total,
                                                  "loss": info.loss, "lr": info.lr,
                                                  "it_per_s": round(info.step / max(now - t0, 1e-6), 3)})
        if not host.interrupted():  # ComfyUI's bar raises on Cancel; the loop checks should_stop itself
            bar.update(info.step)

    def on_preview(step, images):
        from ..trainers.grids import to_pil

        host.send_event("finetune.preview", {"run": run.path.name, "step": step,
                                             "images": [f"samples/step-{step}-{i}.png" for i in range(len(images))]})
        if host.in_comfyui() and not host.interrupted():
            bar.update(step, preview=("PNG", to_pil(images[0]), 256))

    work = model.clone()
    try:
        result = train(work, dataset, method, cfg, run, Callbacks(on_step=on_step, should_stop=host.interrupted,
                                                                  on_preview=on_preview),
                       resume=bool(resume_run.strip()), extra_config=extra_config)
    finally:
        bar.close()
    if result.cancelled:
        msg = f"cancelled at step {result.step}; resume with resume_run='{run.path.name}'"
        host.log.info("%s (checkpoint written)", msg)
        host.raise_if_interrupted(msg)
        raise host.Interrupted(msg)
    return result


class FT_TrainLoRA:
    DESCRIPTION = ("Train a LoRA (low-rank adapter, through peft) on a captioned dataset. Outputs the model with the "
                   "LoRA applied, the LoRA itself (save it with Save LoRA) and the training log. Progress shows "
                   "on the node; Cancel writes a checkpoint first, and resume_run continues it. Each run keeps "
                   "its config, log, checkpoints and samples in output/finetune/<run>.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL", "FT_LORA", "FT_TRAINING_LOG")
    RETURN_NAMES = ("model", "lora", "log")
    OUTPUT_TOOLTIPS = ("The base model with the trained LoRA merged in, ready for Sample.",
                       "The LoRA: connect Save LoRA to write it to models/loras, or Apply LoRA.",
                       "Loss per step, learning rate, timings and config: connect Loss Plot.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The base model to adapt (it is not changed; training works on a copy)."),
                "dataset": LINK("FT_DATASET", "Captioned pictures of the concept."),
                "steps": INT(500, 1, 1_000_000, "Optimizer steps in total."),
                "learning_rate": FLOAT(1e-4, 1e-7, 1.0, "Peak learning rate (LoRA: 1e-4 on SD, ~1e-3 on the toy).",
                                       step=1e-5, round=False),
                "batch_size": INT(1, 1, 256, "Pictures per step."),
                "rank": INT(8, 1, 256, "LoRA rank: the adapter's capacity (4-32 is usual)."),
                "alpha": FLOAT(8.0, 0.01, 1024.0, "LoRA alpha: the update is scaled by alpha / rank (alpha = rank "
                               "keeps it at 1).", step=0.5),
                "seed": SEED("Seeds noise, timesteps, data order and dropout: same inputs, same LoRA."),
                "target_modules": COMBO(LORA_TARGETS, "Which layers get adapters: attention only (small, the "
                                        "usual choice), + feed-forward, + convolutions (LoCon, most capacity)."),
                "train_text_encoder": BOOLEAN(False, "Also adapt the text encoder's attention (stronger binding of "
                                              "the token, more drift)."),
                "text_encoder_lr": FLOAT(0.0, 0.0, 1.0, "Learning rate of the text encoder (0 = same as "
                                         "learning_rate).", step=1e-5, round=False),
                "run_name": STRING("lora", "Name of the run folder under output/finetune (a counter is added when "
                                   "it exists)."),
            },
            "optional": dict(LOOP_OPTIONS),
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model, dataset, steps, learning_rate, batch_size, rank, alpha, seed, target_modules,
                train_text_encoder, text_encoder_lr, run_name, **opt):
        from ..trainers.lora import LoRAMethod, apply_lora
        from ..trainers.loop import TrainingLog

        cfg = loop_config(steps, learning_rate, batch_size, seed, **opt)
        method = LoRAMethod(rank, alpha, target_modules, train_text_encoder, text_encoder_lr)
        result = run_training(model, dataset, method, cfg, run_name, opt.get("resume_run", ""))
        res = dataset.resolution or model.native_size
        lora = method.export(name=result.run_dir.name,
                             metadata={"finetune_config": result.config, "steps": result.step,
                                       "resolution": [res, res]})
        method.remove()
        tuned = apply_lora(result.model, lora, 1.0)
        tuned.history[-1] = {"trained": "lora", "run": result.run_dir.name, "steps": result.step, "rank": rank}
        return (tuned, lora, TrainingLog.from_result(result))


CAPTION_MODES = ["dataset captions", "object templates", "style templates"]


class FT_TrainTextualInversion:
    DESCRIPTION = ("Textual Inversion: teach the model a new word (e.g. <my-cat>) from pictures, by learning only that "
                   "word's embedding vectors; every other weight stays exactly as it was. Outputs the model with the "
                   "word added, the embedding (save it with Save Embedding: ComfyUI's embedding:name, A1111 and "
                   "diffusers read it) and the training log.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL", "FT_EMBEDDING", "FT_TRAINING_LOG")
    RETURN_NAMES = ("model", "embedding", "log")
    OUTPUT_TOOLTIPS = ("The model with the new word added, ready for Sample.",
                       "The learned vectors: connect Save Embedding or Apply Embedding.",
                       "Loss per step, learning rate, timings and config.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The base model (not changed; training works on a copy)."),
                "dataset": LINK("FT_DATASET", "Pictures of the concept."),
                "token": STRING("<my-concept>", "The new word to learn; it must not exist yet (use brackets, "
                                "e.g. <my-cat>)."),
                "init_token": STRING("object", "A single known word whose embedding the new word starts from "
                                     "(e.g. cat, star, painting)."),
                "num_vectors": INT(1, 1, 32, "Embedding vectors for the word: more can hold more detail, but "
                                   "take prompt space and learn slower."),
                "steps": INT(1000, 1, 1_000_000, "Optimizer steps in total."),
                "learning_rate": FLOAT(5e-3, 1e-7, 1.0, "Peak learning rate (TI usually 1e-3 to 1e-2).",
                                       step=1e-4, round=False),
                "batch_size": INT(1, 1, 256, "Pictures per step."),
                "seed": SEED("Seeds noise, timesteps, data order and templates: same inputs, same embedding."),
                "caption_mode": COMBO(CAPTION_MODES, "Captions to train with: the dataset's own (they must contain "
                                      "the token), or random object / style templates with the token."),
                "run_name": STRING("textual_inversion", "Name of the run folder under output/finetune."),
            },
            "optional": dict(LOOP_OPTIONS),
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model, dataset, token, init_token, num_vectors, steps, learning_rate, batch_size, seed,
                caption_mode, run_name, **opt):
        from ..trainers.loop import TrainingLog
        from ..trainers.textual_inversion import OBJECT_TEMPLATES, STYLE_TEMPLATES, TextualInversionMethod

        token = token.strip()
        method = TextualInversionMethod(token, init_token, num_vectors)
        method.validate(model)
        if caption_mode == "dataset captions":
            if not any(token in e.caption for e in dataset.examples):
                raise ValueError(f"caption_mode 'dataset captions': no caption of the dataset contains the token "
                                 f"{token!r}. Put it in the captions (e.g. caption 'a photo of {{token}}' with "
                                 f"token {token!r}), or choose object or style templates")
        else:
            templates = OBJECT_TEMPLATES if caption_mode == "object templates" else STYLE_TEMPLATES
            dataset = dataset.with_options(caption_templates=templates, template_token=token)
        cfg = loop_config(steps, learning_rate, batch_size, seed, **opt)
        result = run_training(model, dataset, method, cfg, run_name, opt.get("resume_run", ""))
        method.finish()
        emb = method.export(result.run_dir.name, {"token": token, "init_token": init_token, "steps": result.step,
                                                  "finetune_config": result.config})
        tuned = result.model
        tuned.history = tuned.history + [{"trained": "textual_inversion", "run": result.run_dir.name,
                                          "token": token, "steps": result.step}]
        return (tuned, emb, TrainingLog.from_result(result))


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
                "class_dataset": LINK("FT_DATASET", "Your own class pictures (missing ones are generated)."),
            },
        }

    def execute(self, dataset, instance_prompt, class_prompt, previous=None, class_dataset=None):
        from ..trainers.dreambooth import Subject

        return (list(previous or []) + [Subject(dataset, instance_prompt.strip(), class_prompt.strip(),
                                                class_dataset)],)


class FT_TrainDreamBooth:
    DESCRIPTION = ("DreamBooth: bind a rare identifier ('a sks dog') to a subject from a few pictures, as a LoRA or a "
                   "full fine-tune. With prior preservation each step also trains on class pictures ('a dog'), which "
                   "are generated from the base model when not given (and cached), so the class keeps its meaning. "
                   "Several subjects: chain DreamBooth Subject nodes into subjects. The output model is a valid "
                   "model input of another training node (two stages).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_MODEL", "FT_LORA", "FT_TRAINING_LOG", "FT_EMBEDDING")
    RETURN_NAMES = ("model", "lora", "log", "embedding")
    OUTPUT_TOOLTIPS = ("The tuned model, ready for Sample or another training stage.",
                       "The LoRA (lora mode; in full mode the weights are in the model output).",
                       "Loss per step, learning rate, timings and config.",
                       "With pivotal tuning: the identifier's embedding; save it beside the LoRA with Save "
                       "Embedding (ComfyUI and A1111 then load both).")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The base model (not changed; training works on a copy)."),
                "dataset": LINK("FT_DATASET", "The instance pictures (ignored when subjects is connected)."),
                "instance_prompt": STRING("a sks dog", "Prompt with the rare identifier for the instance pictures."),
                "class_prompt": STRING("a dog", "Prompt of the subject's class (for prior preservation)."),
                "prior_preservation": BOOLEAN(True, "Also train on class pictures so the class word keeps its "
                                              "meaning (less language drift)."),
                "prior_loss_weight": FLOAT(1.0, 0.0, 100.0, "Lambda: weight of the class loss.", step=0.05),
                "num_class_images": INT(100, 1, 100_000, "Class pictures per subject (generated if missing)."),
                "mode": COMBO(["lora", "full"], "lora: a small adapter; full: every UNet weight (strongest, "
                              "largest)."),
                "train_text_encoder": BOOLEAN(False, "Also train the text encoder (LoRA or full)."),
                "steps": INT(400, 1, 1_000_000, "Optimizer steps in total."),
                "learning_rate": FLOAT(1e-4, 1e-7, 1.0, "Peak learning rate (full: ~5e-6 on SD; LoRA: ~1e-4).",
                                       step=1e-6, round=False),
                "batch_size": INT(1, 1, 256, "Instance pictures per step (as many class pictures are added)."),
                "seed": SEED("Seeds training and class-picture generation."),
                "run_name": STRING("dreambooth", "Name of the run folder under output/finetune."),
            },
            "optional": {
                "class_dataset": LINK("FT_DATASET", "Your own class pictures (missing ones are generated)."),
                "subjects": LINK("FT_SUBJECTS", "Several subjects from chained DreamBooth Subject nodes."),
                "rank": INT(8, 1, 256, "LoRA rank (lora mode)."),
                "alpha": FLOAT(8.0, 0.01, 1024.0, "LoRA alpha (lora mode).", step=0.5),
                "target_modules": COMBO(LORA_TARGETS, "Layers with adapters (lora mode).", "attention+feedforward"),
                "pivotal_tuning": BOOLEAN(False, "lora mode: also learn an embedding for the identifier (Textual "
                                          "Inversion + LoRA). The identifier must be a new word, e.g. 'a <sks> "
                                          "dog'; it starts from the class prompt's last word."),
                "embedding_lr": FLOAT(5e-3, 0.0, 1.0, "Learning rate of the pivotal embedding (0 = learning_rate).",
                                      step=1e-4, round=False),
                **LOOP_OPTIONS,
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model, dataset, instance_prompt, class_prompt, prior_preservation, prior_loss_weight,
                num_class_images, mode, train_text_encoder, steps, learning_rate, batch_size, seed, run_name,
                class_dataset=None, subjects=None, rank=8, alpha=8.0, target_modules="attention+feedforward",
                pivotal_tuning=False, embedding_lr=5e-3, **opt):
        from ..trainers.dreambooth import (DreamBoothMethod, PivotalMethod, Subject, check_subjects, class_images,
                                           instance_dataset, make_inner)
        from ..trainers.textual_inversion import TextualInversionMethod
        from ..trainers.lora import apply_lora
        from ..trainers.loop import TrainingLog

        subs = list(subjects) if subjects else [Subject(dataset, instance_prompt.strip(), class_prompt.strip(),
                                                        class_dataset)]
        check_subjects(subs, prior_preservation, prior_loss_weight)
        inner = make_inner(mode, train_text_encoder, rank, alpha, target_modules)
        ti = None
        if pivotal_tuning:
            if mode != "lora":
                raise ValueError("pivotal_tuning needs mode 'lora' (a full fine-tune has no separate adapter)")
            if len(subs) != 1:
                raise ValueError("pivotal_tuning trains one subject at a time; chain stages for more")
            words = subs[0].class_prompt.split()
            ti = TextualInversionMethod(subs[0].identifier, words[-1] if words else "object")
            ti.validate(model)
            inner = PivotalMethod(inner, ti, embedding_lr)
        cfg = loop_config(steps, learning_rate, batch_size, seed, **opt)
        class_sets = []
        if prior_preservation:
            res = (subs[0].dataset.resolution or model.native_size)
            cache = host.output_dir() / "finetune" / "class_images"
            for i, s in enumerate(subs):
                given = [e.image for e in s.class_dataset.examples][:num_class_images] if s.class_dataset else []
                missing = num_class_images - len(given)
                made = []
                if missing > 0:
                    with host.Progress(missing, desc=f"class pictures: {s.class_prompt}") as bar:
                        made, generated = class_images(model, s.class_prompt, missing, res, seed + 7919 * i, cache,
                                                       lambda d, n: bar.update(d))
                    host.log.info("%s %d class pictures of %r", "generated" if generated else "reused cached",
                                  missing, s.class_prompt)
                class_sets.append((given + made, s.class_prompt))
        method = DreamBoothMethod(mode, inner, prior_loss_weight, class_sets)
        extra = {"subjects": [{"instance_prompt": s.instance_prompt, "class_prompt": s.class_prompt,
                               "identifier": s.identifier, "images": len(s.dataset.examples)} for s in subs]}
        result = run_training(model, instance_dataset(subs), method, cfg, run_name, opt.get("resume_run", ""),
                              extra_config=extra)
        tuned, lora, emb = result.model, None, None
        if mode == "lora":
            lora_method = inner.lora if ti is not None else inner
            res_px = subs[0].dataset.resolution or model.native_size
            lora = lora_method.export(name=result.run_dir.name, metadata={"finetune_config": result.config,
                                                                           "steps": result.step,
                                                                           "resolution": [res_px, res_px]})
            lora_method.remove()
            tuned = apply_lora(tuned, lora, 1.0)
            tuned.history = tuned.history[:-1]
            if ti is not None:
                ti.finish()
                emb = ti.export(result.run_dir.name, {"token": ti.token, "init_token": ti.init_token,
                                                      "steps": result.step, "pivotal_lora": result.run_dir.name})
        else:
            inner.finish()
        tuned.history = tuned.history + [{"trained": f"dreambooth-{mode}", "run": result.run_dir.name,
                                          "steps": result.step, "subjects": extra["subjects"]}]
        return (tuned, lora, TrainingLog.from_result(result), emb)


PREPROCESSOR_NAMES = ["canny", "soft_edges", "scribble", "tile_blur", "grayscale"]  # == preprocess.PREPROCESSORS


class FT_TrainControlNet:
    DESCRIPTION = ("Train a ControlNet for a model: it starts as a copy of the model's UNet encoder with zero output "
                   "convolutions (so it changes nothing at first) and learns to make the picture follow a condition. "
                   "The condition of each training picture is made on the fly by the chosen preprocessor, or taken "
                   "from a conditions dataset paired by file name. Only the ControlNet trains. Outputs the "
                   "ControlNet (Apply ControlNet, Save ControlNet) and the training log; Cancel and resume_run work "
                   "as for the other trainers.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FT_CONTROLNET", "FT_TRAINING_LOG")
    RETURN_NAMES = ("control_net", "log")
    OUTPUT_TOOLTIPS = ("The trained ControlNet: connect Apply ControlNet or Save ControlNet.",
                       "Loss per step, learning rate, timings and config: connect Loss Plot.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": LINK("FT_MODEL", "The base model the ControlNet is for (it stays frozen)."),
                "dataset": LINK("FT_DATASET", "Captioned training pictures; vary position and size, since the "
                                "condition is what should carry the layout."),
                "preprocessor": COMBO(PREPROCESSOR_NAMES, "Makes each training picture's condition on the fly "
                                      "(ignored when a conditions dataset is connected)."),
                "steps": INT(1000, 1, 1_000_000, "Optimizer steps in total."),
                "learning_rate": FLOAT(1e-5, 1e-7, 1.0, "Peak learning rate (SD: 1e-5; the toy: 1e-3).", step=1e-6,
                                       round=False),
                "batch_size": INT(4, 1, 256, "Pictures per step."),
                "seed": SEED("Seeds noise, timesteps, data order and caption dropout: same inputs, same result."),
                "caption_dropout": FLOAT(0.5, 0.0, 0.99, "Share of steps whose caption is dropped, so the ControlNet "
                                         "learns to follow the condition alone (the paper drops half).", step=0.05),
                "run_name": STRING("controlnet", "Name of the run folder under output/finetune."),
            },
            "optional": {
                "conditions": LINK("FT_DATASET", "Condition images paired with the training pictures by file name "
                                   "(any extension), instead of the preprocessor: load their folder with Load Image "
                                   "Dataset (its caption is not used; put any, e.g. 'condition')."),
                "control_net": LINK("FT_CONTROLNET", "Continue training this ControlNet instead of starting from "
                                    "the UNet."),
                "low_threshold": FLOAT(0.4, 0.01, 0.99, "Canny: weak-edge threshold (toy pictures: 0.1)."),
                "high_threshold": FLOAT(0.8, 0.01, 0.99, "Canny: strong-edge threshold (toy pictures: 0.2)."),
                **LOOP_OPTIONS,
            },
            "hidden": HIDDEN,
        }

    @torch_call
    def execute(self, model, dataset, preprocessor, steps, learning_rate, batch_size, seed, caption_dropout, run_name,
                conditions=None, control_net=None, low_threshold=0.4, high_threshold=0.8, **opt):
        from ..trainers.controlnet import ControlNetMethod
        from ..trainers.data import pair_conditions
        from ..trainers.loop import TrainingLog

        cfg = loop_config(steps, learning_rate, batch_size, seed, **opt)
        if conditions is not None:
            dataset = pair_conditions(dataset, conditions)
            method = ControlNetMethod(None, init=control_net, name=run_name.strip() or "controlnet")
        else:
            options = {"low_threshold": low_threshold, "high_threshold": high_threshold} if preprocessor == "canny" \
                else {}
            method = ControlNetMethod(preprocessor, options, init=control_net, name=run_name.strip() or "controlnet")
        dataset = dataset.with_options(caption_dropout=caption_dropout)
        result = run_training(model, dataset, method, cfg, run_name, opt.get("resume_run", ""))
        cn = method.result()
        cn.name = result.run_dir.name
        cn.source = f"trained: run {result.run_dir.name}, {result.step} steps"
        cn.meta = {"finetune_config": json.dumps(result.config, default=str)}
        return (cn, TrainingLog.from_result(result))
