"""Start a real ComfyUI on loopback with this pack linked into its custom_nodes (for the integration tests)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent


def comfyui_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p) if p and (Path(p) / "main.py").is_file() else None


def skip_reason() -> str:
    p = os.environ.get("COMFYUI_PATH")
    if not p:
        return "COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the integration tests"
    return f"COMFYUI_PATH={p} has no main.py: it is not a ComfyUI checkout"


def front_end_root() -> Path | None:
    """An unpacked front end to serve instead of the one ComfyUI pins (``--front-end-root``): the ``static`` folder of a
    comfyui-frontend-package wheel, from ``$COMFYUI_FRONTEND_ROOT``; None when unset or not such a folder."""
    p = os.environ.get("COMFYUI_FRONTEND_ROOT")
    return Path(p) if p and (Path(p) / "index.html").is_file() else None


def front_end_skip_reason() -> str:
    p = os.environ.get("COMFYUI_FRONTEND_ROOT")
    if not p:
        return ("COMFYUI_FRONTEND_ROOT is not set: point it at the static/ folder of an unpacked "
                "comfyui-frontend-package wheel (tests/README.md) to test that front end too")
    return f"COMFYUI_FRONTEND_ROOT={p} has no index.html: it is not a front end's static/ folder"


def offline_flags(root: Path) -> list[str]:
    """The flags that keep a test ComfyUI off the network and free of optional services, as its own command line
    declares them (comfy/cli_args.py): ``--offline`` where it exists (newer ComfyUI, where ``--disable-api-nodes``
    is its deprecated alias), else ``--disable-api-nodes`` (0.8); and ``--disable-assets`` where there is an assets
    database, which needs SQLAlchemy to start."""
    declared = (root / "comfy" / "cli_args.py").read_text(encoding="utf-8", errors="replace")
    flags = ["--offline" if '"--offline"' in declared else "--disable-api-nodes"]
    return flags + (["--disable-assets"] if '"--disable-assets"' in declared else [])


class ComfyServer:
    def __init__(self, base: Path, *flags: str):
        self.base = base
        self.flags = flags  # more of ComfyUI's command-line flags (e.g. --bf16-unet for a full-size SDXL)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ComfyServer":
        root = comfyui_path()
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "comfyui-finetune"
        if not link.exists():
            link.symlink_to(PACK, target_is_directory=True)
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", *offline_flags(root), "--base-directory", str(self.base), *self.flags]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def free(self, wait: float = 2) -> None:
        """Ask ComfyUI to unload its models and free their memory (its /free route), e.g. before the test's own
        process loads a large model; then this process collects its own garbage."""
        import gc

        self.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(wait)  # the request is handled between prompts, by the prompt worker
        gc.collect()

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format graph and wait for its history entry."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "ft-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s:\n{self.log()[-3000:]}")


#: ComfyUI's ControlNet loader in its own python (argv[1]: the file): it logs missing keys as warnings and unexpected
#: ones at debug level, so both show; prints "LOADED ControlNet <number of weights>"
CONTROLNET_PROBE = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stdout); path = sys.argv[1]; "
    "sys.argv[1:] = ['--cpu']; import comfy.options; comfy.options.enable_args_parsing(); "
    "import comfy.controlnet as c; m = c.load_controlnet(path); "
    "print('LOADED', type(m).__name__, sum(p.numel() for p in m.control_model.parameters()))")


def load_controlnet_in_comfyui(path: Path) -> int:
    """The number of weights ComfyUI's own ControlNet loader reads from ``path``; fails on a missing or unexpected
    key."""
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", CONTROLNET_PROBE, str(path)],
                         cwd=str(comfyui_path()), capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert "LOADED ControlNet" in text, text[-3000:]
    assert "missing controlnet keys" not in text and "unexpected controlnet keys" not in text, text[-3000:]
    return int(text.split("LOADED ControlNet")[1].split()[0])


#: the pack's load check (nodes/load_check.py) run inside ComfyUI's own python, where it reads with ComfyUI's loaders:
#: ``kind`` lora, embedding, checkpoint or controlnet (the file read back into the pack's value first), folder (an
#: fp16 diffusers folder against the model the pack reads from it), or lora-keys (any file's keys matched for
#: ``family``, as Save LoRA matches them)
LOAD_CHECK_PROBE = """
import json, os, sys, tempfile
from pathlib import Path
kind, path, pack, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
sys.argv = [sys.argv[0], '--cpu']
import comfy.options
comfy.options.enable_args_parsing()
link = Path(tempfile.mkdtemp()) / 'comfyui_finetune'
link.symlink_to(pack, target_is_directory=True)
sys.path.insert(0, str(link.parent))
from comfyui_finetune.nodes import host, load_check
from comfyui_finetune.trainers.families.registry import FAMILIES
from comfyui_finetune.trainers.runs import reading
assert host.in_comfyui()
state, meta = reading.read(path, kind) if kind != 'folder' else ({}, {})
try:
    if kind == 'folder':
        import torch
        from comfyui_finetune.trainers.model.loading import load_diffusers_folder
        got = load_check.check_folder(path, load_diffusers_folder(path, 'cpu', 'fp32'), torch.float16)
        out = {'text': str(got), 'by': got.by, 'applied': got.applied, 'total': got.total}
    elif kind == 'lora-keys':
        total, ignored = load_check.comfy_lora_ignored(path, FAMILIES[extra['family']])
        out = {'total': total, 'ignored': ignored}
    else:
        if kind == 'lora':
            from comfyui_finetune.trainers.methods.lora import lora_from_state
            got = load_check.check_lora(path, lora_from_state(state, path.stem, meta))
        elif kind == 'embedding':
            from comfyui_finetune.trainers.methods.textual_inversion import embedding_from_state
            got = load_check.check_embedding(path, Path(extra['root']), embedding_from_state(state, path.stem, meta))
        elif kind == 'checkpoint':
            got = load_check.check_checkpoint(path, state, FAMILIES[extra['family']])
        else:
            from comfyui_finetune.trainers.adapters.controlnet.files import load_file
            got = load_check.check_controlnet(path, load_file(path), extra['layout'], extra['dtype'])
        out = {'text': str(got), 'by': got.by, 'applied': got.applied, 'total': got.total}
except load_check.NotApplied as e:
    out = {'error': str(e)}
print('RESULT ' + json.dumps(out))
"""


def checked_in_comfyui(kind: str, path: Path, **extra) -> dict:
    """What the pack's load check says of ``path`` inside ComfyUI (:data:`LOAD_CHECK_PROBE`)."""
    out = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", LOAD_CHECK_PROBE, kind, str(path),
                          str(PACK), json.dumps(extra)], cwd=str(comfyui_path()), capture_output=True, text=True,
                         timeout=900)
    text = out.stdout + out.stderr
    killed = " (killed: out of memory?)" if out.returncode in (-9, 137) else ""
    assert "RESULT " in text, f"the probe ended with {out.returncode}{killed}: " + text[-3000:]
    return json.loads(text.split("RESULT ", 1)[1].splitlines()[0])


#: ComfyUI's "Import times for custom nodes" lines: "   0.4 seconds: <path>" or "   0.0 seconds (IMPORT FAILED): <path>"
_IMPORT_LINE = re.compile(r"(?:^|\s)(?P<s>[0-9]+\.[0-9]+) seconds(?P<failed> \(IMPORT FAILED\))?: (?P<path>.+?)\s*$")


def pack_import(log: str, folder: str = "comfyui-finetune") -> tuple[float, bool] | None:
    """(seconds, failed) from ComfyUI's import-time line for the custom-node folder ``folder``, or None when the
    log has no such line. Only the pack's own line counts: ComfyUI's own optional modules (its audio nodes when
    torchaudio has no working build) print IMPORT FAILED lines that say nothing about the pack."""
    for line in log.splitlines():
        m = _IMPORT_LINE.search(line)
        if m and re.split(r"[\\/]", m["path"].rstrip("/\\"))[-1] == folder:
            return float(m["s"]), bool(m["failed"])
    return None


def ft_sample(graph: dict, tag: str, model: list) -> dict:
    """Add FT_Sample (64 px, 2 ddim steps, seed 0) -> SaveImage."""
    graph.update({
        f"{tag}1": {"class_type": "FT_Sample", "inputs": {
            "model": model, "prompt": "a photo of sks", "negative_prompt": "", "seed": 0, "steps": 2, "cfg": 2.0,
            "sampler": "ddim", "width": 64, "height": 64, "batch_size": 1}},
        f"{tag}2": {"class_type": "SaveImage", "inputs": {"images": [f"{tag}1", 0], "filename_prefix": f"ft_{tag}"}},
    })
    return graph


def made_apart(module: str, base: Path) -> dict:
    """``<module>.make(base)`` (a test module's pack side) in a process of its own that ends before ComfyUI loads
    anything, so every byte it held is returned; what it printed last, then what it returned."""
    here = Path(__file__).resolve().parent
    code = (f"import json, sys; from pathlib import Path; import {module} as t; "
            "print('RESULT ' + json.dumps(t.make(Path(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, str(base)], cwd=here, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": str(here)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print("\n".join(ln for ln in done.stdout.splitlines()[-12:] if not ln.startswith("RESULT ")))
    return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def picture(server, entry: dict, save_node: str):
    """The first picture a SaveImage node wrote, as floats 0..255."""
    import numpy as np
    from PIL import Image

    img = entry["outputs"][save_node]["images"][0]
    return np.asarray(Image.open(server.base / "output" / img["subfolder"] / img["filename"]), dtype=np.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(family: str, dtype=None, seed: int = 0):
    """An FTModel of ``family``'s architecture with random weights (tests/random_models.py), with ComfyUI's copy of
    the CLIP tokenizer."""
    from random_models import random_model as build

    return build(family, comfyui_path() / "comfy" / "sd1_tokenizer", dtype=dtype, seed=seed)


def random_sd15_model(base: Path):
    """An SD1.5-architecture model with random weights, also saved in ComfyUI's models/diffusers folder (ComfyUI's
    DiffusersLoader reads it)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from comfyui_finetune.trainers.runs.export import legacy_text_encoder_keys

    model = random_model("sd15")
    folder = base / "models" / "diffusers" / "random-sd15"
    StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                            unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(folder))
    legacy_text_encoder_keys(folder / "text_encoder")
    return model
