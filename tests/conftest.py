from __future__ import annotations

import os

import pytest

os.environ.setdefault("FT_NO_PROGRESS", "1")  # no tqdm bars in test logs


@pytest.fixture(scope="session")
def toy():
    """The shipped toy model, loaded once per test session (tests must not change it: clone first)."""
    import torch

    from comfyui_finetune.trainers.toy.loader import load_toy_model

    with torch.inference_mode(False):
        return load_toy_model()


@pytest.fixture(scope="session")
def toy_xl():
    """The shipped toy SDXL (two text encoders, pooled embedding and time ids), loaded once per test session."""
    import torch

    from comfyui_finetune.trainers.toy.loader import load_toy_xl_model

    with torch.inference_mode(False):
        return load_toy_xl_model()


@pytest.fixture(scope="session")
def judge():
    from comfyui_finetune.trainers.toy.loader import load_toy_judge

    return load_toy_judge()


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Fresh input/output/models folders for the fallback host (as the runner's flags would set them)."""
    from comfyui_finetune.nodes import host

    saved = dict(host._fallback)
    dirs = {k: tmp_path / k for k in ("input", "output", "models")}
    for d in dirs.values():
        d.mkdir()
    host.set_folders(**dirs)
    yield dirs
    host._fallback.update(saved)


@pytest.fixture
def press_cancel_at(monkeypatch):
    """``press_cancel_at(n)``: ComfyUI's Cancel is pressed when a training node's progress reaches step ``n``
    (``monkeypatch.undo()`` releases it)."""
    from comfyui_finetune.nodes import host

    def arm(step: int) -> None:
        def update(self, value, preview=None):
            if value == step:
                host.request_interrupt()

        monkeypatch.setattr(host.Progress, "update", update)

    return arm
