"""A base model from its source string is the library's (trainers.sources): the built-in toys by name, model
files through the caller's folder lookup (ComfyUI's, passed by the nodes and the shell), never ComfyUI itself."""
from __future__ import annotations

import pytest

from comfyui_finetune.nodes.models import base_model_choices
from comfyui_finetune.trainers.sources import BUILTINS, builtin, load_base_model
from comfyui_finetune.trainers.toy.loader import TOY_AUDIO_SOURCE, TOY_SOURCE, TOY_XL_SOURCE, TOY_ZIMAGE_SOURCE


def test_the_builtins_are_named_once_and_listed_first(folders):
    assert list(BUILTINS) == [TOY_SOURCE, TOY_XL_SOURCE, TOY_AUDIO_SOURCE, TOY_ZIMAGE_SOURCE] == \
        base_model_choices()[:4]
    assert builtin("toy_zimage").source == TOY_ZIMAGE_SOURCE
    assert builtin("toy") is builtin(TOY_SOURCE) is BUILTINS[TOY_SOURCE]
    assert builtin("toy_xl").source == TOY_XL_SOURCE and builtin("checkpoints/toy") is None
    assert builtin("toy_audio").source == TOY_AUDIO_SOURCE


def test_model_files_are_found_through_the_callers_lookup():
    asked = []

    def resolve(kind, name):
        asked.append((kind, name))
        raise FileNotFoundError(f"{kind} model {name!r} was not found in nowhere")

    with pytest.raises(FileNotFoundError, match="diffusers model 'mine'"):
        load_base_model("diffusers/mine", resolve=resolve)
    with pytest.raises(FileNotFoundError, match="checkpoints model 'm.safetensors'"):
        load_base_model("checkpoints/m.safetensors", resolve=resolve,
                        tokenizer_dir=lambda folder: pytest.fail("the vocabulary is asked for only once the file is found"))
    assert asked == [("diffusers", "mine"), ("checkpoints", "m.safetensors")]
    with pytest.raises(ValueError, match=r"needs resolve\(kind, name\)"):
        load_base_model("diffusers/mine")
    with pytest.raises(ValueError, match=r"'mine' is not 'toy \(built-in\)', 'diffusers/<folder>' or "):
        load_base_model("mine", resolve=resolve)
    with pytest.raises(ValueError, match="offload 'sometimes' is not one of auto, off"):
        load_base_model("toy", offload="sometimes")


def test_a_toy_loads_by_its_short_name_and_records_its_source():
    model = load_base_model("toy", "cpu")
    assert model.source == TOY_SOURCE and model.prediction_source == "the toy's own"
