"""Tests of the headless workflow runner, with tiny fake nodes (no torch, no models)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from comfyui_finetune import runner
from comfyui_finetune.nodes import host

CALLS: list[tuple[str, object]] = []


class Number:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 100})}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "make"

    def make(self, value):
        CALLS.append(("Number", value))
        return (value,)


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("NUMBER",), "b": ("NUMBER",)},
                "optional": {"scale": ("FLOAT", {"min": 0.0, "max": 10.0}), "mode": (["sum", "diff"],)}}

    RETURN_TYPES = ("NUMBER", "STRING")
    RETURN_NAMES = ("total", "text")
    FUNCTION = "add"

    def add(self, a, b, scale=1, mode="sum"):
        CALLS.append(("Add", (a, b, scale, mode)))
        total = (a + b if mode == "sum" else a - b) * scale
        return (total, str(total))


class Record:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",), "label": ("STRING", {"default": "x"})},
                "optional": {"flag": ("BOOLEAN", {"default": False}), "any": ("*",)},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "record"
    OUTPUT_NODE = True

    def record(self, x, label, flag=False, any=None, unique_id=None, prompt=None, extra_pnginfo=None):
        CALLS.append(("Record", (x, label, unique_id, prompt is not None, extra_pnginfo)))
        return {"ui": {"values": [x], "label": [label]}}


class Boom:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",)}}

    RETURN_TYPES = ()
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, x):
        raise ValueError("kaboom")


class Gray:
    """An IMAGE source: a batch of two 4x5 RGB images, as numpy (the runner's saver takes numpy or torch)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"level": ("FLOAT", {"min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    def make(self, level):
        return (np.full((2, 4, 5, 3), level, dtype=np.float32),)


MAPPINGS = {"Number": Number, "Add": Add, "Record": Record, "Boom": Boom, "Gray": Gray,
            "SaveImage": runner.SaveImage, "PreviewImage": runner.PreviewImage}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    CALLS.clear()
    monkeypatch.setattr(host, "_fallback", {"input": None, "output": tmp_path / "out", "models": None})


def good_prompt() -> dict:
    return {
        "1": {"class_type": "Number", "inputs": {"value": 2}, "_meta": {"title": "two"}},
        "2": {"class_type": "Number", "inputs": {"value": 3.0}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0], "mode": "sum", "unknown": 5}},
        "4": {"class_type": "Record", "inputs": {"x": ["3", 0], "label": ["3", 1]}},
        "5": {"class_type": "Number", "inputs": {"value": 99}},  # not an ancestor of an output: never runs
        "6": {"class_type": "Record", "inputs": {"x": ["1", 0], "label": "six", "flag": True}},
    }


# ------------------------------------------------------------------------------------------------ execution --
def test_runs_ancestors_of_outputs_once_in_order(caplog):
    caplog.set_level("INFO", logger=runner.__name__)
    ui = runner.run(good_prompt(), MAPPINGS)
    assert any(r.getMessage().startswith("node 4 (Record) done in ") for r in caplog.records)
    assert ui == {"4": {"values": [5], "label": ["5"]}, "6": {"values": [2], "label": ["six"]}}
    names = [c[0] for c in CALLS]
    assert ("Number", 99) not in CALLS
    assert names.count("Number") == 2  # node 1 feeds two nodes but runs once
    assert names.index("Add") > max(i for i, n in enumerate(names[:3]) if n == "Number")
    assert ("Number", 3) in CALLS and isinstance([v for n, v in CALLS if n == "Number"][1], int)  # 3.0 -> 3
    record4 = next(v for n, v in CALLS if n == "Record" and v[2] == "4")
    assert record4 == (5, "5", "4", True, None)  # hidden inputs: unique_id, prompt, extra_pnginfo


def test_optional_inputs_only_passed_when_given():
    prompt = good_prompt()
    prompt["3"]["inputs"] = {"a": ["1", 0], "b": ["2", 0]}
    runner.run(prompt, MAPPINGS)
    assert ("Add", (2, 3, 1.0, "sum")) in CALLS


def test_no_output_node():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}}}
    with pytest.raises(runner.WorkflowError, match="no output node"):
        runner.run(prompt, MAPPINGS)


def test_node_failure_is_wrapped():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "7": {"class_type": "Boom", "inputs": {"x": ["1", 0]}}}
    with pytest.raises(runner.NodeExecutionError) as info:
        runner.run(prompt, MAPPINGS)
    assert str(info.value) == "node 7 (Boom) failed: kaboom"
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_return_value_is_a_node_error():
    class Bad(Number):
        def make(self, value):
            return value  # not a tuple

    prompt = {"1": {"class_type": "Bad", "inputs": {"value": 1}}, "2": {"class_type": "Record",
                                                                     "inputs": {"x": ["1", 0], "label": "l"}}}
    with pytest.raises(runner.NodeExecutionError, match=r"node 1 \(Bad\) failed: .*expected a tuple"):
        runner.run(prompt, {**MAPPINGS, "Bad": Bad})


# ----------------------------------------------------------------------------------------------- validation --
def _set(node: str, name: str, value):
    def change(p):
        p[node]["inputs"][name] = value
    return change


def _delete(node: str, name: str):
    def change(p):
        del p[node]["inputs"][name]
    return change


def _add(node: str, entry: dict):
    def change(p):
        p[node] = entry
    return change


CASES = {
    "unknown class": (_add("9", {"class_type": "KSampler", "inputs": {}}),
                      ["node 9 (KSampler)", "unknown node type 'KSampler'", "SaveImage, PreviewImage"]),
    "missing required": (_delete("3", "b"), ["node 3 (Add): input 'b'", "missing"]),
    "missing required widget": (_delete("6", "label"), ["node 6 (Record): input 'label'", "missing"]),
    "link to absent node": (_set("4", "x", ["77", 0]), ["node 4 (Record): input 'x'", "'77'", "not in the workflow"]),
    "output index": (_set("4", "x", ["3", 5]), ["node 4 (Record): input 'x'", "output 5 of node 3 (Add)", "2 output"]),
    "type mismatch": (_set("4", "x", ["3", 1]),
                      ["node 4 (Record): input 'x'", "expects NUMBER", "which is STRING"]),
    "malformed link": (_set("4", "x", ["3"]), ["node 4 (Record): input 'x'", "malformed link"]),
    "int is bool": (_set("1", "value", True), ["node 1 (Number): input 'value'", "True is not an integer"]),
    "int is float": (_set("1", "value", 2.5), ["node 1 (Number): input 'value'", "2.5 is not an integer"]),
    "int below min": (_set("1", "value", -1), ["node 1 (Number): input 'value': -1 is below the minimum 0"]),
    "int above max": (_set("1", "value", 101), ["node 1 (Number): input 'value': 101 is above the maximum 100"]),
    "float type": (_set("3", "scale", "big"), ["node 3 (Add): input 'scale'", "'big' is not a number"]),
    "float above max": (_set("3", "scale", 10.5), ["node 3 (Add): input 'scale': 10.5 is above the maximum 10.0"]),
    "string type": (_set("6", "label", 5), ["node 6 (Record): input 'label'", "5 is not a string"]),
    "boolean type": (_set("6", "flag", "yes"), ["node 6 (Record): input 'flag'", "'yes' is not true or false"]),
    "combo value": (_set("3", "mode", "product"),
                    ["node 3 (Add): input 'mode'", "'product' is not one of the allowed values: 'sum', 'diff'"]),
    "custom literal": (_set("4", "x", 5), ["node 4 (Record): input 'x'", "NUMBER inputs must be linked"]),
    "not a node": (_add("8", {"inputs": {}}), ["node 8: not a node"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors_name_node_class_and_input(case):
    change, expected = CASES[case]
    prompt = good_prompt()
    change(prompt)
    errors = runner.validate(prompt, MAPPINGS)
    assert len(errors) == 1, errors
    for text in expected:
        assert text in errors[0], (text, errors[0])
    with pytest.raises(runner.WorkflowError) as info:
        runner.run(prompt, MAPPINGS)
    assert str(info.value) == errors[0] and CALLS == []  # nothing ran


def test_all_errors_are_collected_one_per_line():
    prompt = good_prompt()
    for change, _ in CASES.values():
        change(prompt)
    with pytest.raises(runner.WorkflowError) as info:
        runner.run(prompt, MAPPINGS)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.errors) >= 8
    assert any("KSampler" in line for line in lines) and any("'mode'" in line for line in lines)


def test_combo_list_is_truncated_to_ten():
    class Many(Record):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("NUMBER",), "label": ([f"v{i}" for i in range(25)],)}}

    prompt = good_prompt()
    prompt["6"] = {"class_type": "Many", "inputs": {"x": ["1", 0], "label": "nope"}}
    [error] = runner.validate(prompt, {**MAPPINGS, "Many": Many})
    assert "'v9'" in error and "'v10'" not in error and "25 in all" in error


def test_combo_accepts_linked_string_and_wildcards_match():
    prompt = good_prompt()
    prompt["3"]["inputs"]["mode"] = ["3", 1]  # a STRING output into a combo: accepted (a self-link is a cycle)
    prompt["9"] = {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0], "mode": ["3", 1]}}
    prompt["6"]["inputs"]["any"] = ["3", 1]  # a '*' input takes anything
    errors = runner.validate(prompt, MAPPINGS)
    assert len(errors) == 1 and "cycle" in errors[0]
    del prompt["3"]["inputs"]["mode"]
    assert runner.validate(prompt, MAPPINGS) == []


def test_cycle_is_reported_with_its_nodes():
    prompt = good_prompt()
    prompt["1"] = {"class_type": "Add", "inputs": {"a": ["3", 0], "b": ["2", 0]}}
    errors = runner.validate(prompt, MAPPINGS)
    assert len(errors) == 1, errors
    assert "cycle" in errors[0] and "1 (Add)" in errors[0] and "3 (Add)" in errors[0]
    assert "2 (Number)" not in errors[0]


# ------------------------------------------------------------------------------------------------- loading --
def test_load_rejects_ui_format(tmp_path):
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(runner.WorkflowError, match="UI-format.*Export \\(API\\)"):
        runner.load_workflow(path)


def test_load_accepts_prompt_wrapper_and_plain(tmp_path):
    prompt = good_prompt()
    (tmp_path / "wrapped.json").write_text(json.dumps({"prompt": prompt, "client_id": "x"}))
    (tmp_path / "plain.json").write_text(json.dumps(prompt))
    assert runner.load_workflow(tmp_path / "wrapped.json") == prompt
    assert runner.load_workflow(tmp_path / "plain.json") == prompt


@pytest.mark.parametrize("text", ["{not json", "[]", "{}"])
def test_load_rejects_garbage(tmp_path, text):
    (tmp_path / "w.json").write_text(text)
    with pytest.raises(runner.WorkflowError):
        runner.load_workflow(tmp_path / "w.json")
    with pytest.raises(runner.WorkflowError, match="cannot read"):
        runner.load_workflow(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- SaveImage --
def _save_prompt(prefix: str, kind: str = "SaveImage") -> dict:
    inputs = {"images": ["1", 0]} | ({"filename_prefix": prefix} if kind == "SaveImage" else {})
    return {"1": {"class_type": "Gray", "inputs": {"level": 0.5}}, "2": {"class_type": kind, "inputs": inputs}}


def test_save_image_counts_on_and_uses_subfolders(tmp_path):
    out = tmp_path / "custom"
    (out / "renders").mkdir(parents=True)
    (out / "renders" / "cat_00007_.png").write_bytes(b"")
    (out / "renders" / "dog_00042_.png").write_bytes(b"")
    ui = runner.run(_save_prompt("renders/cat"), MAPPINGS, output_dir=out)
    assert ui["2"]["images"] == [{"filename": "cat_00008_.png", "subfolder": "renders", "type": "output"},
                                 {"filename": "cat_00009_.png", "subfolder": "renders", "type": "output"}]
    from PIL import Image

    with Image.open(out / "renders" / "cat_00008_.png") as im:
        assert im.size == (5, 4) and im.getpixel((0, 0)) == (128, 128, 128)
        assert json.loads(im.text["prompt"])["2"]["class_type"] == "SaveImage"
    ui = runner.run(_save_prompt("plain"), MAPPINGS)
    assert [i["filename"] for i in ui["2"]["images"]] == ["plain_00001_.png", "plain_00002_.png"]
    assert ui["2"]["images"][0]["subfolder"] == "" and (out / "plain_00002_.png").is_file()


def test_preview_image_goes_to_preview_folder(tmp_path):
    ui = runner.run(_save_prompt("", kind="PreviewImage"), MAPPINGS, output_dir=tmp_path / "o")
    [first, _] = ui["2"]["images"]
    assert first["type"] == "temp" and (tmp_path / "o" / "preview" / first["filename"]).is_file()


@pytest.mark.parametrize("prefix", ["../x", "a/../../x", "/abs/x", ""])
def test_save_image_rejects_prefixes_outside_output(tmp_path, prefix):
    with pytest.raises(runner.NodeExecutionError, match=r"node 2 \(SaveImage\) failed: filename_prefix"):
        runner.run(_save_prompt(prefix), MAPPINGS, output_dir=tmp_path / "o")
    assert not (tmp_path / "x").exists()


def test_save_image_takes_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    images = torch.zeros(1, 2, 3, 3)
    images[..., 0] = 2.0  # clamped to 1
    ui = runner.SaveImage().save_images(images, "t")
    from PIL import Image

    with Image.open(host.output_dir() / ui["ui"]["images"][0]["filename"]) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)


def test_core_nodes_declare_tooltips():
    for cls in (runner.SaveImage, runner.PreviewImage):
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1]["tooltip"], name
        assert cls.OUTPUT_NODE and cls.RETURN_TYPES == ()


# ---------------------------------------------------------------------------------------------------- CLI --
def test_cli_run_exit_codes(tmp_path, monkeypatch, capsys):
    from comfyui_finetune.__main__ import main

    monkeypatch.setattr(runner, "node_mappings", lambda: dict(MAPPINGS))
    good, bad, ui_file = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "ui.json"
    good.write_text(json.dumps(_save_prompt("cli/img")))
    bad.write_text(json.dumps({"1": {"class_type": "Number", "inputs": {"value": 1}},
                               "2": {"class_type": "Boom", "inputs": {"x": ["1", 0]}}}))
    ui_file.write_text(json.dumps({"nodes": [], "links": []}))
    out = tmp_path / "cli_out"
    assert main(["run", str(good), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"node 2 (SaveImage): saved {out / 'cli' / f'img_0000{i}_.png'}" for i in (1, 2)]
    assert main(["run", str(bad), "--out", str(out)]) == 1
    assert "node 2 (Boom) failed: kaboom" in capsys.readouterr().err
    assert main(["run", str(ui_file), "--out", str(out)]) == 2
    assert "UI-format" in capsys.readouterr().err


def test_validate_does_not_mutate_prompt():
    prompt = good_prompt()
    before = copy.deepcopy(prompt)
    runner.validate(prompt, MAPPINGS)
    runner.run(prompt, MAPPINGS)
    assert prompt == before
