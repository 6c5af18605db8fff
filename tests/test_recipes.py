"""One declaration per option: every training node's inputs are its recipe, config.json reads back into the same
recipe, and a config of another method or a newer pack is refused with an error naming the field."""
from __future__ import annotations

import json

import pytest

from comfyui_finetune import NODE_CLASS_MAPPINGS
from comfyui_finetune.nodes.base import MAX_SEED
from comfyui_finetune.trainers.config import recipes as R

TRAINING_NODES = {name: cls for name, cls in NODE_CLASS_MAPPINGS.items() if name.startswith("FT_Train")}


def test_every_training_node_has_a_recipe():
    assert set(TRAINING_NODES) == {"FT_TrainLoRA", "FT_TrainTextualInversion", "FT_TrainDreamBooth",
                                   "FT_TrainControlNet"}
    for cls in TRAINING_NODES.values():
        assert cls.METHOD in R.METHODS, cls


def test_each_method_is_declared_once_in_the_table():
    """METHODS: the recipe names the method, the train function is the method's own (imported when first asked),
    the label is how people see it; every training node names its entry."""
    for name, entry in R.METHODS.items():
        assert entry.name == entry.recipe.method == name
        assert callable(entry.train) and entry.train.__name__ == f"train_{name}"
    assert len({e.label for e in R.METHODS.values()}) == len(R.METHODS)
    assert R.label_of("textual_inversion") == "Textual Inversion" and R.label_of("unknown") == "unknown"
    assert sorted(cls.METHOD for cls in TRAINING_NODES.values()) == sorted(R.METHODS)


@pytest.mark.parametrize("node", sorted(TRAINING_NODES))
def test_node_inputs_are_what_the_recipe_declares(node):
    """Names, order, types, defaults, ranges, choices and tooltips: nothing is typed twice, nothing drifts."""
    cls = TRAINING_NODES[node]
    recipe = R.METHODS[cls.METHOD].recipe
    spec = cls.INPUT_TYPES()
    widgets = {sec: [n for n, s in spec[sec].items() if not (isinstance(s[0], str) and s[0].startswith("FT_"))]
               for sec in ("required", "optional")}
    assert widgets["required"] == list(recipe.required)
    assert widgets["optional"] == list(recipe.optional)
    declared = recipe.options()
    assert sorted(recipe.required + recipe.optional) == sorted(declared), "every option is an input, once"
    for sec in ("required", "optional"):
        for name in widgets[sec]:
            kind, opts = spec[sec][name]
            f, m = declared[name], declared[name].metadata
            assert opts["tooltip"] == m["help"] and opts["default"] == f.default, name
            if m["choices"] is not None:
                assert kind == R.choices_of(m["choices"]) and f.default in kind, name
            elif isinstance(f.default, bool):
                assert kind == "BOOLEAN", name
            elif isinstance(f.default, int):
                assert kind == "INT" and (opts["min"], opts["max"]) == (m["min"], m["max"]), name
            elif isinstance(f.default, float):
                assert kind == "FLOAT" and (opts["min"], opts["max"]) == (m["min"], m["max"]), name
            else:
                assert kind == "STRING", name
    seed = spec["required"]["seed"][1]
    assert seed["max"] == MAX_SEED and seed["control_after_generate"]


def test_choices_come_from_the_library_tables():
    from comfyui_finetune.trainers.methods.dreambooth import MODES
    from comfyui_finetune.trainers.loop.training import LOSSES, PRECISIONS
    from comfyui_finetune.trainers.loop.optimizers import LR_SCHEDULERS, OPTIMIZERS
    from comfyui_finetune.trainers.methods.lora import TARGET_CHOICES
    from comfyui_finetune.trainers.data.preprocess import PREPROCESSORS
    from comfyui_finetune.trainers.methods.textual_inversion import CAPTION_MODES

    opt = NODE_CLASS_MAPPINGS["FT_TrainLoRA"].INPUT_TYPES()["optional"]
    assert opt["optimizer"][0] == list(OPTIMIZERS) and opt["lr_scheduler"][0] == list(LR_SCHEDULERS)
    assert opt["loss"][0] == list(LOSSES) and opt["mixed_precision"][0] == list(PRECISIONS)
    assert NODE_CLASS_MAPPINGS["FT_TrainLoRA"].INPUT_TYPES()["required"]["target_modules"][0] == list(TARGET_CHOICES)
    assert NODE_CLASS_MAPPINGS["FT_TrainDreamBooth"].INPUT_TYPES()["required"]["mode"][0] == list(MODES)
    ti = NODE_CLASS_MAPPINGS["FT_TrainTextualInversion"].INPUT_TYPES()["required"]
    assert ti["caption_mode"][0] == list(CAPTION_MODES)
    cn = NODE_CLASS_MAPPINGS["FT_TrainControlNet"].INPUT_TYPES()["required"]
    assert cn["preprocessor"][0] == list(PREPROCESSORS)


def test_recipes_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, comfyui_finetune.trainers.config.recipes as r; r.LoRARecipe.options(); "
            "[(e.recipe.options(), e.label) for e in r.METHODS.values()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_pack_version_is_the_pyproject_version():
    import tomllib
    from pathlib import Path

    import comfyui_finetune

    pyproject = tomllib.loads((Path(comfyui_finetune.__file__).parent / "pyproject.toml").read_text())
    assert R.PACK_VERSION == pyproject["project"]["version"] == comfyui_finetune.__version__


@pytest.mark.parametrize("method", sorted(R.METHODS))
def test_config_round_trip_gives_the_same_recipe(method):
    cls = R.METHODS[method].recipe
    changed = {"steps": 77, "seed": 12345678901234, "learning_rate": 3e-4, "optimizer": "sgd",
               "validation_prompt": "a <b>red</b> circle"}
    recipe = cls(**changed)
    cfg = json.loads(json.dumps(R.run_config(recipe, {"family": "toy"}, {"images": 1})))
    back, whole = R.read_config(cfg, method=method)
    assert back == recipe and type(back) is cls and whole["pack"]["version"] == R.PACK_VERSION
    assert "resume_run" not in cfg["recipe"], "run control is not part of what a config repeats"


def test_a_config_of_another_method_or_a_newer_pack_is_refused():
    lora = R.run_config(R.LoRARecipe(rank=4), {}, {})
    with pytest.raises(ValueError, match="method is 'lora', not 'textual_inversion'"):
        R.read_config(lora, method="textual_inversion")
    wrong = {**lora, "method": "textual_inversion"}
    with pytest.raises(ValueError, match=r"recipe\.rank is not an option of textual_inversion"):
        R.read_config(wrong)
    newer = {**lora, "pack": {"version": "9.0.0"}}
    with pytest.raises(ValueError, match=r"pack\.version 9\.0\.0 is newer than this pack"):
        R.read_config(newer)
    with pytest.raises(ValueError, match="format 2 is newer"):
        R.read_config({**lora, "format": 2})
    with pytest.raises(ValueError, match="method 'sdxl_magic' is not known"):
        R.read_config({**lora, "method": "sdxl_magic"})
    bad = {**lora, "recipe": {**lora["recipe"], "rank": 0}}
    with pytest.raises(ValueError, match="recipe: rank must be at least 1, got 0"):
        R.read_config(bad)


@pytest.mark.parametrize("kw, message", [
    ({"rank": 0}, "rank must be at least 1, got 0"),
    ({"rank": 257}, "rank must be at most 256, got 257"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"optimizer": "adamw9000"}, "optimizer 'adamw9000' is not known; choose one of: adamw, adam"),
    ({"target_modules": "everything"}, "target_modules 'everything' is not known"),
    ({"train_text_encoder": "yes"}, "train_text_encoder must be true or false"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be at least 0"),
])
def test_bad_values_name_the_input(kw, message):
    with pytest.raises(ValueError, match=message):
        R.LoRARecipe(**kw)


def test_cross_field_checks():
    with pytest.raises(ValueError, match="pivotal_tuning needs mode 'lora'"):
        R.DreamBoothRecipe(mode="full", pivotal_tuning=True)
    with pytest.raises(ValueError, match="low_threshold 0.6 must not exceed high_threshold 0.3"):
        R.ControlNetRecipe(low_threshold=0.6, high_threshold=0.3)
    assert R.ControlNetRecipe(preprocessor="scribble").preprocessor_options() == {}


def test_a_trained_run_writes_a_config_that_reads_back(toy, folders):
    from comfyui_finetune.nodes.datasets import FT_ToyDataset

    ds = FT_ToyDataset().execute("purple", "star", 4, "a sks star", 0, "narrow")[0]
    _, _, log = NODE_CLASS_MAPPINGS["FT_TrainLoRA"]().execute(
        toy, ds, steps=2, learning_rate=1e-3, batch_size=2, rank=4, alpha=4.0, seed=3, target_modules="attention",
        train_text_encoder=False, text_encoder_lr=0.0, run_name="cfg", optimizer="adam", snr_gamma=0.0)
    path = folders["output"] / "finetune" / log.run / "config.json"
    recipe, cfg = R.read_config(path, method="lora")
    assert recipe == R.LoRARecipe(steps=2, learning_rate=1e-3, batch_size=2, rank=4, alpha=4.0, seed=3,
                                  target_modules="attention", run_name="cfg", optimizer="adam", snr_gamma=0.0,
                                  validation_cfg=2.0)  # auto, resolved to the toy's guidance
    assert cfg["chosen"]["validation_cfg"].startswith("auto: ")
    assert cfg["model"]["source"] == "toy (built-in)" or cfg["model"]["name"] == "toy"
    assert cfg["model"]["fingerprint"] == toy.fingerprint() and cfg["dataset"]["images"] == 4
    assert (path.parent / "dataset" / "dataset.json").is_file() and (path.parent / "lora.safetensors").is_file()


def test_a_python_caller_may_pass_the_required_inputs_by_position(toy, folders):
    from comfyui_finetune.nodes.datasets import FT_ToyDataset

    ds = FT_ToyDataset().execute("purple", "star", 2, "a sks star", 0, "narrow")[0]
    node = NODE_CLASS_MAPPINGS["FT_TrainLoRA"]()
    _, lora, log = node.execute(toy, ds, 1, 1e-3, 2, 4, 4.0, 0, "attention", False, 0.0, "positional")
    assert log.run == "positional" and log.steps == 1 and lora.rank == 4
    with pytest.raises(TypeError, match="11 positional values, but the node has 10 required inputs"):
        node.execute(toy, ds, 1, 1e-3, 2, 4, 4.0, 0, "attention", False, 0.0, "x", "y")
    with pytest.raises(TypeError, match="steps given both by position and by name"):
        node.execute(toy, ds, 1, steps=2)


def test_gradient_checkpointing_reads_the_old_switch_and_auto_follows_the_family(toy):
    """gradient_checkpointing was true / false before auto / on / off: older workflows, config.json files and API
    prompts still work (true = on, false = off), ComfyUI's combo check is the node's own (VALIDATE_INPUTS), and auto
    turns it on for SDXL on a GPU only."""
    import types

    import torch

    from comfyui_finetune.trainers.loop.precision import checkpointing

    assert R.LoRARecipe().gradient_checkpointing == "auto"
    assert R.LoRARecipe(gradient_checkpointing=True).gradient_checkpointing == "on"
    assert R.DreamBoothRecipe(gradient_checkpointing=False).gradient_checkpointing == "off"
    assert R.LoRARecipe.from_dict({"gradient_checkpointing": True}).gradient_checkpointing == "on"
    for bad in (1, "true", "sometimes"):
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            R.LoRARecipe(gradient_checkpointing=bad)
    for cls in TRAINING_NODES.values():
        for ok in ("auto", "on", "off", True, False):
            assert cls.VALIDATE_INPUTS(gradient_checkpointing=ok) is True, (cls, ok)
        assert cls.VALIDATE_INPUTS(gradient_checkpointing="sometimes") == (
            "gradient_checkpointing 'sometimes' is not known; choose one of: auto, on, off")

    def on(family, device, value):
        from comfyui_finetune.trainers.families.registry import FAMILIES

        model = types.SimpleNamespace(family=FAMILIES[family], device=torch.device(device))
        return checkpointing(model, R.LoRARecipe(gradient_checkpointing=value))

    assert on("sdxl", "cuda", "auto") and not on("sdxl", "cpu", "auto")
    assert not on("sd15", "cuda", "auto") and not on("toy_xl", "cuda", "auto")
    assert on("sd15", "cpu", "on") and not on("sdxl", "cuda", "off")
    assert not checkpointing(toy, R.LoRARecipe())


def test_an_older_api_prompt_with_the_switch_still_validates():
    from comfyui_finetune import runner
    from comfyui_finetune.workflows import EXAMPLES

    prompt = json.loads((EXAMPLES / "api" / "toy_train_lora.json").read_text())
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == "FT_TrainLoRA"]
    for old in (True, False):
        prompt[nid]["inputs"]["gradient_checkpointing"] = old
        assert runner.validate(prompt) == []
    prompt[nid]["inputs"]["gradient_checkpointing"] = "sometimes"
    assert runner.validate(prompt) == [f"node {nid} (FT_TrainLoRA): input 'gradient_checkpointing': "
                                       "gradient_checkpointing 'sometimes' is not known; choose one of: auto, on, off"]
