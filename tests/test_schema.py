"""Every node follows the pack's conventions, so nobody has to remember them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from comfyui_finetune import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY

NODES = sorted(NODE_CLASS_MAPPINGS.items())


def test_mappings_agree():
    assert NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    assert WEB_DIRECTORY == "./web"


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_schema(node_id, cls):
    assert node_id.startswith("FT_") and node_id == cls.__name__
    assert cls.CATEGORY.startswith("finetune/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls, cls.FUNCTION))
    assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
    if cls.RETURN_TYPES:
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    for t in cls.RETURN_TYPES:
        assert t in ("IMAGE", "MASK", "AUDIO", "STRING", "FLOAT", "INT", "LATENT") or t.startswith("FT_"), t
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, inp in spec.get(section, {}).items():
            kind, opts = inp[0], inp[1]
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if kind in ("INT", "FLOAT"):
                for key in ("default", "min", "max", "step"):
                    assert key in opts, f"{node_id}.{name} lacks {key}"
                assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name} default out of range"
            elif isinstance(kind, list):
                assert kind, f"{node_id}.{name} is an empty combo"
                assert opts.get("default") in kind, f"{node_id}.{name} default not among its options"
            elif kind in ("STRING", "BOOLEAN"):
                assert "default" in opts
            else:
                assert kind in ("IMAGE", "MASK", "AUDIO") or kind.startswith("FT_"), f"{node_id}.{name}: type {kind}"


def test_sampler_names_match_library():
    from comfyui_finetune.nodes.sample import SAMPLER_NAMES
    from comfyui_finetune.trainers.sampling import SAMPLERS

    assert SAMPLER_NAMES == ["auto", *SAMPLERS]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_is_light_and_fast():
    out = _run("import sys, time; t = time.perf_counter(); import comfyui_finetune; "
               "dt = time.perf_counter() - t; "
               "print(dt, 'torch' in sys.modules, 'diffusers' in sys.modules, 'transformers' in sys.modules)")
    dt, torch_loaded, diffusers_loaded, tf_loaded = out.split()
    assert (torch_loaded, diffusers_loaded, tf_loaded) == ("False", "False", "False"), \
        "importing the pack must not import torch/diffusers/transformers (ComfyUI start-up time)"
    assert float(dt) < 0.5, f"importing the pack took {float(dt):.2f}s"


def test_trainers_never_import_comfyui():
    out = _run(
        "import sys, pkgutil, importlib\n"
        "import comfyui_finetune.trainers as t\n"
        "mods = [m.name for m in pkgutil.walk_packages(t.__path__, 'comfyui_finetune.trainers.') "
        "if not m.name.endswith('__main__')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server', 'execution', "
        "'comfy_execution', 'comfy_api')]\n"
        "print(len(mods), bad)")
    n, bad = out.split(" ", 1)
    assert int(n) >= 5 and bad.strip() == "[]", out


def test_trainers_source_never_imports_nodes_or_comfyui():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "trainers"
    offenders = []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for n in names:
                top = n.lstrip(".").split(".")[0]
                if top in ("nodes", "comfy", "folder_paths", "server", "execution", "comfy_execution", "comfy_api") \
                        and not (n.startswith(".") and top != "nodes"):
                    offenders.append(f"{f.relative_to(root.parent)}: {n}")
    assert not offenders, offenders
