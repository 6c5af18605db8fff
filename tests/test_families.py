"""The family registry is the one place that knows what differs between families: the library and the nodes ask
it (trainers/families.py) instead of branching on a family's name, so adding a family is one registry entry, its
shipped configs, its key maps and its tests."""
from __future__ import annotations

import ast
from pathlib import Path

from comfyui_finetune.trainers.families.registry import FAMILIES

PACK = Path(__file__).resolve().parent.parent


def _family_branches(path: Path) -> list[str]:
    """Comparisons of a ``.family`` attribute (or a ``family`` name) with a family's name, and dict or set literals
    keyed by family names."""
    names = set(FAMILIES)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            about_family = any((isinstance(s, ast.Attribute) and s.attr == "family")
                               or (isinstance(s, ast.Name) and s.id == "family") for s in sides)
            literals = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)}
            if about_family and literals & names:
                found.append(f"{path.name}:{node.lineno} compares a family with {sorted(literals & names)}")
        if isinstance(node, (ast.Dict, ast.Set)):
            keys = node.keys if isinstance(node, ast.Dict) else node.elts
            named = {k.value for k in keys if isinstance(k, ast.Constant)} & names
            if len(named) >= 2:
                found.append(f"{path.name}:{node.lineno} a table keyed by families {sorted(named)}")
    return found


def test_nothing_outside_the_registry_branches_on_a_family_name():
    files = [p for folder in ("trainers", "nodes") for p in (PACK / folder).rglob("*.py")
             if not {"families", "toy"} & set(p.relative_to(PACK).parts)]
    assert len(files) > 30
    found = [f for p in files for f in _family_branches(p)]
    assert not found, "ask trainers/families.py instead: " + "; ".join(found)


def test_the_scan_finds_a_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(model):\n    if model.family == "sd2":\n        return 1\n'
                   'V = {"toy": "a", "sd15": "b"}\n')
    assert len(_family_branches(bad)) == 2


def test_every_family_says_what_the_files_and_samplers_need():
    for fam in FAMILIES.values():
        assert fam.base_model_version and fam.class_cfg > 0, fam.name
        if fam.config:  # a family with shipped configs is read and written as a single file
            from comfyui_finetune.trainers.families.ldm import TEXT_ENCODER_LAYOUTS

            assert fam.text_encoder_files and fam.architecture, fam.name
            assert all(layout in TEXT_ENCODER_LAYOUTS and prefix.endswith(".")
                       for layout, prefix in fam.text_encoder_files), fam.name
            assert fam.detect is not None, fam.name
            subs = {"unet", "vae", "scheduler", "text_encoder", "tokenizer"}
            if len(fam.text_encoder_files) == 2:
                subs |= {"text_encoder_2", "tokenizer_2"}
            assert all((fam.config_dir / s).is_dir() for s in subs), fam.name
            assert fam.unet_config()["cross_attention_dim"] == fam.context_dim, fam.name
        else:
            assert not fam.text_encoder_files, fam.name
