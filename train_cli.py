"""``python -m comfyui_finetune train <run>/config.json``: a training made in ComfyUI, repeated from the shell.

The run folder holds all it needs: config.json names the method, its whole recipe and the base model (the Load
Base Model choice, checked against a fingerprint of its weights), and dataset/ holds the very pictures and captions
it trained on (DreamBooth's class pictures too). The repeat writes the same run folder layout, checkpoints and
result file under ``--out``/finetune; on the CPU with the same seed its result is bit-identical to the node's.

Under ``torchrun --nproc_per_node N`` (and torchrun's rendezvous flags for several machines) every process runs
this same command and PyTorch DistributedDataParallel trains with the global batch ``batch_size × N × grad_accum``;
rank 0 alone writes files. ``--resume`` continues the run in its own folder; ``--stop-after N`` stops cleanly with a
checkpoint after step N, as ComfyUI's Cancel does; Ctrl-C does the same at the end of the current step.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from .flags import named, whole

log = logging.getLogger("comfyui_finetune.train")
#: the most steps a recipe takes (its steps option's range)
MAX_STEPS = 1_000_000


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m comfyui_finetune train``."""
    parser.add_argument("config", help="a run's config.json (output/finetune/<run>/config.json)")
    parser.add_argument("--steps", type=whole(1, MAX_STEPS), default=None,
                        help="train for this many steps in total instead")
    parser.add_argument("--out", type=named, default="./output",
                        help="output folder: runs go to OUT/finetune/ (default ./output)")
    parser.add_argument("--models", type=named, default=None,
                        help="models folder holding checkpoints/, diffusers/ ... (ComfyUI's models/; default ./models)")
    parser.add_argument("--run-name", type=named, default=None,
                        help="name of the new run folder (default: the config's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the config's own run from its last checkpoint, in its folder")
    parser.add_argument("--stop-after", type=whole(1, MAX_STEPS), default=None, metavar="N",
                        help="stop cleanly after step N with a checkpoint (resume later with --resume)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train (auto: the GPU when there is one)")
    parser.add_argument("--scorer", type=named, default=None, metavar="FOLDER",
                        help="a CLIP model folder (transformers layout, safetensors) to score checkpoints with, for "
                             "a config with keep_best")


class ShellCallbacks:
    """Progress lines on stderr, a clean stop on Ctrl-C or after ``stop_after`` steps."""

    def __init__(self, total: int, stop_after: int | None, quiet: bool):
        self.total, self.stop_after, self.quiet = total, stop_after, quiet
        self.stop, self.step, self.t0, self.last = False, 0, time.time(), 0.0

    def loop_callbacks(self):
        from .trainers.loop.training import Callbacks

        return Callbacks(on_step=self.on_step, should_stop=self.should_stop)

    def should_stop(self) -> bool:
        return self.stop or (self.stop_after is not None and self.step >= self.stop_after)

    def on_step(self, info) -> None:
        self.step = info.step
        now = time.time()
        if not self.quiet and (now - self.last > 2 or info.step == info.total):
            self.last = now
            rate = info.step / max(now - self.t0, 1e-6)
            print(f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.2e}  {rate:.2f} it/s",
                  file=sys.stderr, flush=True)

    def interrupt(self, *_):
        self.stop = True
        print("stopping at the end of this step (a checkpoint is written) ...", file=sys.stderr, flush=True)


def load_model(cfg: dict, device: str):
    """The base model config.json names, loaded as Load Base Model loads it, and checked against its fingerprint."""
    from .nodes import host
    from .trainers.sources import load_base_model

    ident = cfg.get("model", {})
    source = ident.get("source", "")
    if not source:
        raise ValueError(f"config.json: model.source is empty: the run's base model ({ident.get('name', '?')}) was "
                         "not loaded by Load Base Model, so the shell cannot load it again")
    history = ident.get("history") or []
    if history or ident.get("token_vectors"):
        raise ValueError(f"config.json: model.history is {json.dumps(history)[:200]}: the base model was changed in "
                         "the graph (a LoRA or embedding applied, or an earlier training) before this run. Save that "
                         "model with Save Checkpoint, load it with Load Base Model and train from it to repeat the "
                         "run from the shell")
    model = load_base_model(source, device, "auto", prediction=ident.get("prediction_type") or "auto",
                            resolve=host.model_path)  # the folders --models set (host.set_folders)
    if ident.get("fingerprint") and model.fingerprint() != ident["fingerprint"]:
        raise ValueError(f"config.json: model.fingerprint {ident['fingerprint']} does not match {source!r} as it is "
                         f"now ({model.fingerprint()}): the file changed since the run, or --models points elsewhere")
    return model


def _dataset(cfg: dict, dataset, extra: dict) -> tuple:
    """Most methods train on the run's dataset alone."""
    return dataset, {}


def _dreambooth_inputs(cfg: dict, dataset, extra: dict) -> tuple:
    """DreamBooth's subjects (each its instance pictures, by caption) and class sets, as the run folder kept them."""
    from .trainers.methods.dreambooth import Subject

    subjects = [Subject(dataset.with_options(examples=[e for e in dataset.examples
                                                        if e.caption == s["instance_prompt"]]),
                        s["instance_prompt"], s["class_prompt"]) for s in cfg.get("subjects", [])]
    class_sets = [([p for p, _ in extra[k]], extra[k][0][1] if extra[k] else "")
                  for k in sorted(extra, key=lambda k: int(k.split("-")[1]))]
    return subjects, {"class_sets": class_sets, "instance": dataset}


def _controlnet_inputs(cfg: dict, dataset, extra: dict) -> tuple:
    """ControlNet's pictures; only a run that started from the UNet can be repeated (a given ControlNet is not
    kept in the run folder)."""
    init = cfg.get("controlnet", {}).get("init", "base UNet encoder")
    if init != "base UNet encoder":
        raise ValueError(f"config.json: controlnet.init is {init!r}: the run continued a ControlNet given in the "
                         "graph, which the run folder does not keep; the shell repeats runs that start from the "
                         "UNet")
    return dataset, {}


#: what a method's train function gets from the run folder (its data and keyword arguments), by method; the others
#: get :func:`_dataset`
SHELL_INPUTS = {"dreambooth": _dreambooth_inputs, "controlnet": _controlnet_inputs}


def run_training(recipe, cfg: dict, src: Path, model, run, callbacks, shard, scorer=None):
    """Call the method's train function (trainers.config.recipes.METHODS) with what the run folder kept."""
    from .trainers.config.recipes import METHODS
    from .trainers.runs.run_dir import read_dataset

    dataset, extra = read_dataset(src / "dataset")
    method = recipe.method
    if method not in METHODS:
        raise ValueError(f"config.json: method {method!r} has no shell training")
    data, kwargs = SHELL_INPUTS.get(method, _dataset)(cfg, dataset, extra)
    return METHODS[method].train(recipe, model, data, run, callbacks, shard, scorer=scorer, **kwargs)


def main_train(args: argparse.Namespace) -> int:
    """Repeat (or resume) a training from its run's config.json, on one process or under torchrun."""
    from .nodes import host
    from .trainers.loop import distributed
    from .trainers.model.loading import resolve_device
    from .trainers.config.recipes import read_config
    from .trainers.runs.run_dir import RunDir, open_run

    try:
        recipe, cfg = read_config(args.config)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = Path(args.config).resolve().parent
    device = str(resolve_device(args.device))
    shard = distributed.init_from_env(device)
    device = distributed.device_for(shard, device)
    host.set_folders(output=args.out, models=args.models)
    try:
        overrides = {"steps": args.steps} if args.steps is not None else {}
        if args.resume:
            overrides["resume_run"] = src.name
        recipe = type(recipe).from_dict({**recipe.to_dict(), **overrides}, where="command line")
        model = load_model(cfg, device)
        if args.resume:
            run = RunDir(src, writes=shard.main)
        else:
            name = recipe.run_name if args.run_name is None else args.run_name
            name = distributed.share(open_run(host.output_dir() / "finetune", name).name if shard.main else None,
                                     shard)
            run = RunDir(host.output_dir() / "finetune" / name, writes=shard.main)
        cb = ShellCallbacks(recipe.steps, args.stop_after, quiet=not shard.main)
        signal.signal(signal.SIGINT, cb.interrupt)
        scorer = None
        if args.scorer is not None:
            from .trainers.eval.metrics import load_clip_scorer

            scorer = load_clip_scorer(args.scorer, device)
        trained = run_training(recipe, cfg, src, model, run, cb.loop_callbacks(), shard, scorer)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if shard.main:
        last = trained.log[-1]["loss"] if trained.log else float("nan")
        state = "stopped" if trained.cancelled else "finished"
        print(json.dumps({"run": str(run.path), "status": state, "step": trained.step, "loss": last,
                          "processes": shard.world, "files": sorted(p.name for p in run.path.iterdir())}, indent=1))
        if trained.cancelled:
            print(f"resume with: python -m comfyui_finetune train {run.path / 'config.json'} --resume",
                  file=sys.stderr)
    distributed.shutdown()
    return 0
