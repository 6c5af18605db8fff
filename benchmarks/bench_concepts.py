"""Every method over every new subject the toy world can make: the subject rate, the class drift and their spread
over training seeds, each judged by the toy judge over --samples pictures (32 by default).

    python benchmarks/bench_concepts.py [--method dreambooth|lora|ti] [--concepts all|purple circle,red cross,...]
                                        [--seeds 0,1,2] [--samples 32] [--pp off,on] [--subjects 1|2]
                                        [--mode lora|full] [--adapter lora,loha,lokr,dora]
                                        [--model toy|toy_xl|toy_zimage] [--cfg auto|2,4]
                                        [--steps N] [--lr X] [--batch N] [--class-images N] [--train-text-encoder]
                                        [--targets T] [--init shape|colour|words] [--json FILE]

Every option not given is the node's default ("auto" learning rate included), so the table measures what a new
user gets. The concepts (:data:`CONCEPTS`): the colour the base never draws on every shape (purple), every known
colour on the shape it never saw (cross), and the known colour / shape pairs it was never shown (blue star, yellow
triangle). Prompts: "a sks <shape>" for the subject and "a <shape>" for its class (a second subject: "a zwx
<shape>"); the drift is the share of class pictures drawn as the subject (its colour and shape), and "class kept"
how much of the base's colour mix for "a <shape>" survives (:func:`kept`). Textual Inversion
learns "<sks>" from "a <sks>" captions, starting from the shape's word (``--init``); it can only recombine what the
base draws (``tests/test_textual_inversion.py``), so only the held-out pairs are its concepts by default.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from comfyui_finetune.trainers.toy.world import BASE_COLORS, HELD_OUT_COMBOS, NEW_COLORS, NEW_SHAPES, SHAPES

#: (colour, shape): the new colour on every shape, every known colour on the new shape, the held-out pairs
CONCEPTS = ([(c, s) for c in NEW_COLORS for s in SHAPES] + [(c, s) for c in BASE_COLORS for s in NEW_SHAPES]
            + list(HELD_OUT_COMBOS))
IDS = ("sks", "zwx")
#: --model: the built-in toys the judge can score, and their loaders (trainers/toy/loader.py)
MODELS = {"toy": "load_toy_model", "toy_xl": "load_toy_xl_model", "toy_zimage": "load_toy_zimage_model"}


def judged(model, judge, prompt: str, samples: int, cfg: float) -> list[tuple[str, str]]:
    """(colour, shape) of ``samples`` pictures of ``prompt`` at guidance ``cfg`` (the same seeds for every model)."""
    from comfyui_finetune.trainers.sampling import sample

    with torch.inference_mode(False):
        res = judge.judge(sample(model, prompt, seeds=list(range(2000, 2000 + samples)), steps=20, cfg=cfg))
    return [(r["color"], r["shape"]) for r in res]


def rate(model, judge, prompt: str, color: str, shape: str, samples: int, cfg: float) -> float:
    return float(np.mean([j == (color, shape) for j in judged(model, judge, prompt, samples, cfg)]))


_BASE_CLASS: dict = {}


def kept(base, judge, shape: str, samples: int, cfg: float, drawn: list[tuple[str, str]]) -> float:
    """How much of the class's colours survive in ``drawn`` (the tuned model's "a <shape>" pictures): 1 - the total
    variation distance between their colours and the base's (1: the same mix; 0: none in common). The drift only
    counts the subject's colour; this also sees a class collapsing onto one colour of its own (classifier-free
    guidance pushing away from an unconditional prediction that learnt the subject)."""
    def mix(pairs):
        colours = [c for c, _ in pairs]
        return {c: colours.count(c) / len(colours) for c in set(colours)}

    key = (id(base), shape, samples, cfg)
    if key not in _BASE_CLASS:
        _BASE_CLASS[key] = mix(judged(base, judge, f"a {shape}", samples, cfg))
    a, b = _BASE_CLASS[key], mix(drawn)
    return 1.0 - 0.5 * sum(abs(a.get(c, 0.0) - b.get(c, 0.0)) for c in set(a) | set(b))


def pictures(color: str, shape: str, caption: str):
    from comfyui_finetune.nodes.datasets import FT_ToyDataset

    return FT_ToyDataset().execute(color, shape, 6, caption, 0, "narrow")[0]


def partner(concept):
    """The second subject trained beside ``concept``: the next concept of another shape and colour."""
    i = CONCEPTS.index(concept)
    return next(c for c in CONCEPTS[i + 1:] + CONCEPTS[:i] if c[0] != concept[0] and c[1] != concept[1])


def train(base, method: str, subjects, seed: int, opts: dict):
    """Train ``subjects`` [(colour, shape, identifier)] with the node of ``method``; returns the tuned model and
    the learning rate the run used."""
    from comfyui_finetune.nodes import train as nodes

    if method == "dreambooth":
        chain = None
        for color, shape, ident in subjects:
            ds = pictures(color, shape, "x")
            chain = nodes.FT_DreamBoothSubject().execute(ds, f"a {ident} {shape}", f"a {shape}", previous=chain)[0]
        model, _, log, _ = nodes.FT_TrainDreamBooth().execute(base, None, subjects=chain, seed=seed,
                                                              run_name="bench", **opts)
    elif method == "lora":
        (color, shape, ident), = subjects
        model, _, log = nodes.FT_TrainLoRA().execute(base, pictures(color, shape, f"a {ident} {shape}"), seed=seed,
                                                     run_name="bench", **opts)
    else:
        (color, shape, ident), = subjects
        opts = dict(opts)
        init = {"shape": shape, "colour": color, "words": f"{color} {shape}"}[opts.pop("init", "shape")]
        model, _, log = nodes.FT_TrainTextualInversion().execute(
            base, pictures(color, shape, f"a <{ident}>"), token=f"<{ident}>", init_token=init, seed=seed,
            run_name="bench", **opts)
    return model, log.config.get("recipe", {}).get("learning_rate"), log.steps


def measure(base, judge, method, concept, seed, opts, n_subjects, samples, cfgs) -> dict:
    """Train once, then judge the subjects and their classes at every guidance in ``cfgs``: {"lr", "steps",
    "seconds", "at": {cfg: {"subject": [...], "drift": [...], "kept": [...]}}} (a value per subject)."""
    subs = [(*concept, IDS[0])] + ([(*partner(concept), IDS[1])] if n_subjects == 2 else [])
    t0 = time.time()
    model, lr, steps = train(base, method, subs, seed, opts)
    out = {"lr": lr, "steps": steps, "at": {}}
    for cfg in cfgs:
        at = out["at"][cfg] = {"subject": [], "drift": [], "kept": []}
        for color, shape, ident in subs:
            prompt = f"a <{ident}>" if method == "ti" else f"a {ident} {shape}"
            at["subject"].append(rate(model, judge, prompt, color, shape, samples, cfg))
            drawn = judged(model, judge, f"a {shape}", samples, cfg)
            at["drift"].append(float(np.mean([j == (color, shape) for j in drawn])))
            at["kept"].append(kept(base, judge, shape, samples, cfg, drawn))
    out["seconds"] = time.time() - t0
    return out


def spread(xs) -> str:
    return f"{np.mean(xs):4.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def options(args, method: str, pp: bool | None) -> dict:
    given = {"steps": args.steps, "learning_rate": args.lr, "batch_size": args.batch,
             "num_class_images": args.class_images, "prior_loss_weight": args.prior_weight, "mode": args.mode,
             "rank": args.rank, "target_modules": args.targets,
             "train_text_encoder": True if args.train_text_encoder else None}
    opts = {k: v for k, v in given.items() if v is not None}
    if method != "dreambooth":
        for k in ("num_class_images", "prior_loss_weight", "mode"):
            opts.pop(k, None)
        if method == "ti":
            for k in ("rank", "target_modules", "train_text_encoder"):
                opts.pop(k, None)
            opts["init"] = args.init
            if args.init == "words":
                opts.setdefault("num_vectors", 2)
    if method == "dreambooth":
        opts["prior_preservation"] = pp
    return opts


def main() -> None:
    import os

    os.environ.setdefault("FT_NO_PROGRESS", "1")
    from comfyui_finetune.flags import positive, whole
    from comfyui_finetune.nodes import host
    from comfyui_finetune.trainers.toy import loader

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["dreambooth", "lora", "ti"], default="dreambooth")
    ap.add_argument("--concepts", default=None, help="'all' or 'colour shape,colour shape' (default: all; TI: the "
                    "held-out pairs)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds")
    ap.add_argument("--samples", type=whole(1), default=32, help="judged pictures per prompt")
    ap.add_argument("--pp", default="off,on", help="DreamBooth: prior preservation off, on or both")
    ap.add_argument("--subjects", type=int, choices=[1, 2], default=1, help="DreamBooth: subjects at once")
    ap.add_argument("--mode", choices=["lora", "full"], default=None)
    ap.add_argument("--adapter", default="lora", help="Train LoRA / DreamBooth: adapter kinds, comma-separated")
    ap.add_argument("--model", choices=list(MODELS), default="toy")
    ap.add_argument("--cfg", type=lambda v: [0.0 if c == "auto" else positive(c) for c in v.split(",")],
                    default=[0.0], help="guidance of the judged pictures, comma-separated: each trained model is "
                    "judged at each (by default auto, the Sample node's: the family's own, 2 on the toy and the "
                    "toy SDXL; 4 was the node's before auto)")
    ap.add_argument("--steps", type=whole(1), default=None)
    ap.add_argument("--lr", type=positive, default=None)
    ap.add_argument("--batch", type=whole(1), default=None)
    ap.add_argument("--class-images", type=whole(1), default=None)
    ap.add_argument("--prior-weight", type=float, default=None)
    ap.add_argument("--rank", type=whole(1), default=None)
    ap.add_argument("--targets", default=None)
    ap.add_argument("--train-text-encoder", action="store_true", help="DreamBooth / Train LoRA: adapt the text "
                    "encoder too")
    ap.add_argument("--init", choices=["shape", "colour", "words"], default="shape", help="Textual Inversion's "
                    "init_token: the concept's shape word, its colour word, or both ('blue star', 2 vectors)")
    ap.add_argument("--json", type=Path, default=None, help="append every run's figures to this file (JSON lines)")
    args = ap.parse_args()
    cfgs = args.cfg
    if args.concepts in (None, "all"):
        concepts = list(HELD_OUT_COMBOS) if args.method == "ti" and args.concepts is None else CONCEPTS
    else:
        concepts = [tuple(c.split()) for c in args.concepts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        host.set_folders(output=Path(tmp) / "out", models=Path(tmp) / "models", input=Path(tmp) / "in")
        base = getattr(loader, MODELS[args.model])()
        judge = loader.load_toy_judge()
        for pp in ([None] if args.method != "dreambooth" else [p == "on" for p in args.pp.split(",")]):
            for kind in (args.adapter.split(",") if args.method != "ti" else [None]):
                opts = options(args, args.method, pp) | ({"adapter": kind} if kind else {})
                head = (f"{args.method} on {args.model} (cfg auto = {base.guidance(0):g}), "
                        f"{args.subjects} subject(s), " + ", ".join(f"{k} {v}" for k, v in opts.items()))
                print(f"\n{head}\n  {'concept':16} {'cfg':>4} {'subject':>18} {'drift':>18} {'class kept':>18}   "
                      "lr, steps, s/run")
                table = []
                for concept in concepts:
                    runs = [measure(base, judge, args.method, concept, s, opts, args.subjects, args.samples, cfgs)
                            for s in seeds]
                    row = {"concept": " ".join(concept), "options": opts, "model": args.model,
                           "method": args.method, "subjects": args.subjects, "runs": runs}
                    table.append(row)
                    print_row(row, cfgs, args.subjects)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                for cfg in cfgs:
                    print_summary(table, cfg)


def shown(cfg: float) -> str:
    return f"{cfg:g}" if cfg else "auto"


def print_row(row: dict, cfgs, n_subjects: int) -> None:
    runs = row["runs"]
    for cfg in cfgs:
        first, drift, keep = ([r["at"][cfg][k][0] for r in runs] for k in ("subject", "drift", "kept"))
        second = (f"   2nd {' '.join(partner(tuple(row['concept'].split())))}: "
                  f"{spread([r['at'][cfg]['subject'][1] for r in runs])}" if n_subjects == 2 else "")
        print(f"  {row['concept']:16} {shown(cfg):>4} {spread(first):>18} {spread(drift):>18} {spread(keep):>18}   "
              f"{runs[0]['lr']:g}, {runs[0]['steps']}, {np.mean([r['seconds'] for r in runs]):.0f}{second}",
              flush=True)


def print_summary(table: list[dict], cfg: float) -> None:
    subj = [np.mean([r["at"][cfg]["subject"][0] for r in row["runs"]]) for row in table]
    drift = max(max(r["at"][cfg]["drift"][0] for r in row["runs"]) for row in table)
    keep = min(min(r["at"][cfg]["kept"][0] for r in row["runs"]) for row in table)
    print(f"  cfg {shown(cfg)}: concepts at >= 0.90: {sum(s >= 0.9 for s in subj)} of {len(subj)}; "
          f"worst {min(subj):.2f}; worst drift {drift:.2f}; least class kept {keep:.2f}")


if __name__ == "__main__":
    main()
