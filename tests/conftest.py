from __future__ import annotations

import os

import pytest

os.environ.setdefault("FT_NO_PROGRESS", "1")  # no tqdm bars in test logs
#: -n auto's most workers: each holds its own toy models, judge and trainings
MAX_WORKERS = 4
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the workers share the cores, each its own part of them
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported; the tests' subprocesses too
        os.environ[_var] = _threads  # two torch jobs on the same cores would each run many times slower
    import torch

    torch.set_num_threads(int(_threads))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (README's test command): a worker per core, at most MAX_WORKERS, and one alone when COMFYUI_PATH
    is set, as each integration module starts a ComfyUI of its own (the full-size SDXL one needs 21 GB)."""
    if os.environ.get("COMFYUI_PATH"):
        return 1
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


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
        def update(self, value, preview=None, total=None):
            if value == step:
                host.request_interrupt()

        monkeypatch.setattr(host.Progress, "update", update)

    return arm
