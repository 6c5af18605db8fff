"""Integration: the pack inside a real ComfyUI server (runs when COMFYUI_PATH points at a checkout)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_server import PACK, ComfyServer, comfyui_path, skip_reason

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(comfyui_path() is None, reason=skip_reason())]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy")).start()
    yield srv
    srv.stop()


def test_pack_loads_and_lists_its_nodes(server):
    log = server.log()
    assert "IMPORT FAILED" not in log, log[-3000:]
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("FT_")}
    assert {"FT_LoadBaseModel", "FT_Sample"} <= set(ours)
    for name, node in ours.items():
        assert node["category"].startswith("finetune/"), name
        assert node["python_module"].startswith("custom_nodes."), name
    assert "toy (built-in)" in json.dumps(ours["FT_LoadBaseModel"]["input"])


def test_templates_are_listed(server):
    templates = server.get("/workflow_templates")
    assert "toy_text_to_image" in templates.get("comfyui-finetune", []), templates


def test_api_example_runs(server):
    prompt = json.loads((PACK / "example_workflows" / "api" / "toy_text_to_image.json").read_text())
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    saved = entry["outputs"]["3"]["images"]
    assert len(saved) == 4
    for img in saved:
        assert (server.base / "output" / img["subfolder"] / img["filename"]).is_file()
    assert len(entry["outputs"]["5"]["images"]) == 4
