"""A family is a class (trainers/families/) and the one place that knows what differs between families: the library
and the nodes ask a model's family object instead of branching on a family's name or on a part only one family has,
so adding a family is one class (or instance), its shipped configs, its key maps and a row in the tests."""
from __future__ import annotations

import ast
import re
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
            about_family = any((isinstance(n, ast.Attribute) and n.attr == "family")
                               or (isinstance(n, ast.Name) and n.id == "family") for s in sides for n in ast.walk(s))
            literals = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)}
            if about_family and literals & names:
                found.append(f"{path.name}:{node.lineno} compares a family with {sorted(literals & names)}")
        if isinstance(node, (ast.Dict, ast.Set)):
            keys = node.keys if isinstance(node, ast.Dict) else node.elts
            named = {k.value for k in keys if isinstance(k, ast.Constant)} & names
            if len(named) >= 2:
                found.append(f"{path.name}:{node.lineno} a table keyed by families {sorted(named)}")
    return found


#: what only some families have, or only the UNet / DDPM families: said in families/ (the families), model/ (the
#: model's parts and their files) and objectives/ (DDPM's alphas), and nowhere else
ONE_FAMILYS = re.compile(r"text_encoder_2|tokenizer_2|time_ids|\.unet\(|scaling_factor|alphas_cumprod")
OWNERS = {"families", "model", "objectives", "toy"}


def _outside_the_families() -> list[Path]:
    return [p for folder in ("trainers", "nodes") for p in (PACK / folder).rglob("*.py")
            if not OWNERS & set(p.relative_to(PACK).parts)] + [PACK / "train_cli.py", PACK / "runner.py"]


def _one_familys_words(path: Path) -> list[str]:
    return [f"{path.name}:{i} {m.group(0)}" for i, line in enumerate(path.read_text().splitlines(), 1)
            for m in ONE_FAMILYS.finditer(line)]


def test_nothing_outside_the_families_branches_on_a_family_name():
    files = _outside_the_families()
    assert len(files) > 30
    found = [f for p in files for f in _family_branches(p)]
    assert not found, "ask the model's family (trainers/families/) instead: " + "; ".join(found)


def test_nothing_outside_the_families_names_what_one_family_has():
    found = [f for p in _outside_the_families() for f in _one_familys_words(p)]
    assert not found, ("ask the model or its family (model.text_parts, model.denoise, model.latent_format, "
                       "model.objective(), a picture's framing) instead: " + "; ".join(found))


def test_the_scans_find_a_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(model):\n    if model.family == "sd2":\n        return 1\n'
                   '    if model.family.name == "sdxl":\n        return model.text_encoder_2\n'
                   'V = {"toy": "a", "sd15": "b"}\nx = model.unet(x) * vae.config.scaling_factor\n')
    assert len(_family_branches(bad)) == 3
    assert [w.split()[-1] for w in _one_familys_words(bad)] == ["text_encoder_2", ".unet(", "scaling_factor"]


def test_every_family_says_what_the_files_and_samplers_need():
    for fam in FAMILIES.values():
        assert fam.base_model_version and fam.class_cfg > 0, fam.name
        if fam.config and fam.denoiser_part == "transformer":  # Z-Image: its parts are ComfyUI's three files
            assert fam.architecture and not fam.text_encoder_files, fam.name
            assert all((fam.config_dir / s).is_dir() for s in ("transformer", "vae", "scheduler", "text_encoder"))
            assert fam.unet_config()["cap_feat_dim"] == fam.context_dim, fam.name
        elif fam.config:  # a family with shipped configs is read and written as a single file
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
