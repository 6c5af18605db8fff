"""Host memory of Load Z-Image: the peak resident memory of a fresh process that reads ComfyUI's three Z-Image files
into the pack's modules (``load_zimage_files``, Load Z-Image's call), against the files' sizes.

    python benchmarks/zimage_load_memory.py [--layers 4] [--te-layers 4] [--files DIR]

The files are written with random weights, as ComfyUI users hold them: the transformer in ComfyUI's native layout at
Z-Image's full width with ``--layers`` of its 30 main layers, a Qwen3-4B with ``--te-layers`` of its 36 (CLIPLoader's
``model.`` names), both in bf16, and the whole Flux VAE. ``--files DIR`` writes them there once and reads them from
there again later (to compare two versions of the code on the same files). The parts are built one after another
and kept, so the model's weights are the floor; a part's file read whole beside the module made from it adds that
file again at the peak, read a group of tensors at a time only a group (256 MB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3

#: what the fresh process runs: the libraries imported first, so their own memory is counted apart
CHILD = """
import json, resource, sys, torch, diffusers, transformers
from comfyui_finetune.trainers.model.zimage_files import load_zimage_files
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
d, tok = sys.argv[1], sys.argv[2]
load_zimage_files(f"{d}/transformer.safetensors", f"{d}/qwen3.safetensors", f"{d}/vae.safetensors", tok, "cpu", "bf16")
print(json.dumps({"libraries": before, "peak": rss()}))
"""


def write_files(folder: Path, layers: int, te_layers: int) -> None:
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from comfyui_finetune.trainers.families.zimage_native import to_native
    from comfyui_finetune.trainers.model.zimage_files import built_in

    cfg = ROOT / "configs" / "zimage"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((cfg / "transformer/config.json").read_text()) | {"n_layers": layers}
    torch.manual_seed(0)
    with built_in(torch.bfloat16):
        dit = ZImageTransformer2DModel.from_config(config)
    save_file({k: v.contiguous() for k, v in to_native(dit.state_dict()).items()}, folder / "transformer.safetensors")
    del dit
    te_config = json.loads((cfg / "text_encoder/config.json").read_text()) | {"num_hidden_layers": te_layers}
    with built_in(torch.bfloat16):
        te = Qwen3Model(Qwen3Config(**te_config))
    save_file({"model." + k: v.contiguous() for k, v in te.state_dict().items()}, folder / "qwen3.safetensors")
    del te
    vae = AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text()))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "vae.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="the transformer's main layers (Z-Image has 30)")
    ap.add_argument("--te-layers", type=int, default=4, help="Qwen3-4B's layers (it has 36)")
    ap.add_argument("--files", type=Path, default=None, help="keep the files here (written once) and read them again")
    ap.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        return write_files(args.write, args.layers, args.te_layers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.files or Path(tmp)
        if not (folder / "vae.safetensors").is_file():  # in a process of its own: ru_maxrss is kept across exec, so
            # the loading process, started from this one, must not start from a parent that held the models
            subprocess.run([sys.executable, __file__, "--write", str(folder), "--layers", str(args.layers),
                            "--te-layers", str(args.te_layers)], check=True)
        sizes = {f.name: f.stat().st_size for f in sorted(folder.glob("*.safetensors"))}
        tok = ROOT / "trainers" / "toy" / "weights" / "pipeline_zimage" / "tokenizer"
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tok)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        got = json.loads(out.stdout.strip().splitlines()[-1])
    print("files: " + ", ".join(f"{name} {size / GB:.2f} GB" for name, size in sizes.items()))
    loaded, files = (got["peak"] - got["libraries"]) / GB, sum(sizes.values()) / GB
    print(f"Load Z-Image's process: libraries {got['libraries'] / GB:.2f} GB, peak {got['peak'] / GB:.2f} GB: the "
          f"load added {loaded:.2f} GB at its peak, {loaded / files:.2f} x the three files ({files:.2f} GB)")


if __name__ == "__main__":
    main()
