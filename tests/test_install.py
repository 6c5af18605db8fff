"""The install a newcomer gets: declared dependencies agree everywhere, the oldest set CI tests is the declared
floor, README starts with the two commands .ci/run runs, and the integration test reads ComfyUI's log right."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import pack_import  # noqa: E402

PACK = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _floor(req: str) -> str | None:
    m = re.search(r">=\s*([0-9][0-9a-z.]*)", req)
    return m.group(1) if m else None


def _release(version: str | None) -> tuple[int, ...]:
    """'0.35' and '0.35.0' are the same release."""
    parts = [int(p) for p in (version or "").split(".") if p.isdigit()]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def declared() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomli = pytest.importorskip("tomli")
        tomllib = tomli
    deps = tomllib.loads((PACK / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_name(d): d for d in deps}


def lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def test_requirements_txt_declares_what_pyproject_declares():
    """ComfyUI-Manager installs requirements.txt, pip installs pyproject.toml: the same ranges, torch aside
    (ComfyUI brings its own torch, and a bare 'torch' in requirements.txt would pull a CUDA build over it)."""
    req = {_name(r): r for r in lines(PACK / "requirements.txt")}
    deps = declared()
    assert "torch" not in req
    assert {k: v.replace(" ", "") for k, v in deps.items() if k != "torch"} == \
        {k: v.replace(" ", "") for k, v in req.items()}


def test_the_oldest_set_ci_tests_is_the_declared_floor():
    pins = {_name(p): p.split("==", 1)[1] for p in lines(PACK / ".ci" / "oldest.txt")}
    deps = declared()
    for name, spec in deps.items():
        assert name in pins, f".ci/oldest.txt has no pin for {name} ({spec})"
        if name == "torch":
            assert pins[name] == "2.13.0"  # the registry's other torch builds are multi-GB CUDA builds
            continue
        assert _release(_floor(spec)) == _release(pins[name]), f"{name}: declared {spec}, but CI tests the oldest set with {pins[name]}"


def test_readme_starts_with_the_two_commands_ci_runs():
    text = (PACK / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    install, tests = [ln for ln in block.splitlines() if ln.strip()][:2]
    assert install.startswith("pip install torch==2.13.0 && ") and " demo " in install
    assert tests == "python -m pytest -n auto --dist worksteal"  # every core: tests/conftest.py shares them out
    ci = (PACK / ".ci" / "run").read_text()
    assert "README.md" in ci and "python3 -m pip install" not in ci, "CI must run README's commands in a fresh venv"


LOG = """\
Import times for custom nodes:
   0.0 seconds: /srv/ComfyUI/custom_nodes/websocket_image_save.py
   1.3 seconds: /tmp/pytest/comfy0/custom_nodes/comfyui-finetune

WARNING: some comfy_extras/ nodes did not import correctly. This may be because they are missing some dependencies.
IMPORT FAILED: nodes_audio.py
"""


def test_comfyui_log_reader_counts_only_the_packs_own_import_line():
    assert pack_import(LOG) == (1.3, False)  # ComfyUI's own audio nodes failing is not the pack failing
    failed = LOG.replace("1.3 seconds: /tmp", "0.2 seconds (IMPORT FAILED): /tmp")
    assert pack_import(failed) == (0.2, True)
    assert pack_import(LOG.replace("comfyui-finetune", "other-pack")) is None
    windows = "   2.5 seconds: C:\\ComfyUI\\custom_nodes\\comfyui-finetune\n"
    assert pack_import(windows) == (2.5, False)


def test_the_test_extra_holds_the_optional_optimizers_at_their_floors():
    """CI installs ".[test]": the optimizers extra is in it, so every optimizer is tested, at the pinned floor."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((PACK / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["optimizers"]) <= set(extras["test"])
    pins = {_name(p): p.split("==", 1)[1] for p in lines(PACK / ".ci" / "oldest.txt")}
    for req in extras["optimizers"]:
        assert _release(_floor(req)) == _release(pins[_name(req)]), req
