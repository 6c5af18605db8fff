"""Example workflows: keep each UI-format file (what the canvas loads) in step with its API-format twin.

    python -m comfyui_finetune.workflows                # regenerate every example_workflows/<name>.json from api/
    python -m comfyui_finetune.workflows --thumbnails   # also <name>.jpg, the template browser's card: its result

The API twin is the source of truth (it is what ``POST /prompt`` and the headless runner take); the UI file is
generated from it and the nodes' ``INPUT_TYPES``: widget values in ComfyUI's order (a ``seed`` input is followed
by its "control after generate" value), links, and a left-to-right layout by dependency depth.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "example_workflows"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _is_widget(spec) -> bool:
    kind = spec[0]
    if len(spec) > 1 and spec[1].get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _inputs(cls) -> list[tuple[str, tuple]]:
    spec = cls.INPUT_TYPES()
    return list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())


#: layout, in canvas pixels: a node's least width, the gap between nodes, the title bar above a node's pos, the
#: margin; a title widens its node by about TITLE_CHAR pixels a character (measured in the front end: 7.0 or less)
WIDTH, GAP, TITLE, MARGIN, TITLE_CHAR = 360, 40, 30, 40, 7.2
#: the front end's slot row and widget row heights; a multiline text box takes about three widget rows
SLOT, ROW, MULTILINE = 20, 24, 3
#: room for what a node shows after it runs, so a grown node pushes nothing under its neighbour: the training
#: nodes' chart (150) + "advanced" button + validation preview (256 + caption), pictures, text results, an audio
#: player
SHOWS = {"chart": 150 + ROW + 300, "images": 300, "thumbnails": 240, "text": 110, "audio": 90}


def _shows(cls) -> int:
    name = cls.__name__
    if name.startswith("FT_Train"):
        return SHOWS["chart"]
    if name in ("SaveImage", "PreviewImage"):
        return SHOWS["images"]
    if hasattr(cls, "SHOWS"):  # what the node says it shows (the dataset loaders: thumbnails and a summary)
        return sum(SHOWS[kind] for kind in cls.SHOWS)
    if name.startswith(("FT_Save", "FT_CLIP", "FT_KID", "FT_Eval")):
        return SHOWS["text"]
    return 0


def node_size(cls, title: str = "") -> list[int]:
    """[width, height] that holds the node's title, slots, visible widgets and what it shows after a run (the title
    bar is above this box). Inputs declared ``advanced`` are folded away by the front end and take no room."""
    slots, widgets = 0, 0
    for name, spec in _inputs(cls):
        opts = spec[1] if len(spec) > 1 else {}
        if _is_widget(spec):
            if opts.get("advanced"):
                continue  # folded away until the user shows them
            if opts.get("multiline"):
                widgets += MULTILINE
            else:
                widgets += 2 if opts.get("control_after_generate") or name in ("seed", "noise_seed") else 1
        else:
            slots += 1  # the front end gives every socket its row, connected or not
    rows = max(slots, len(cls.RETURN_TYPES))
    return [max(WIDTH, math.ceil(TITLE_CHAR * len(title)) + 40), 14 + rows * SLOT + widgets * ROW + _shows(cls)]


def api_to_ui(api: dict, mappings: dict) -> dict:
    """Build a UI-format (litegraph, version 0.4) workflow from an API-format graph."""
    ids = {nid: i + 1 for i, nid in enumerate(sorted(api, key=lambda n: int(n) if str(n).isdigit() else n))}
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[nid] = 1 + max((d(str(u)) for u in ups), default=-1)
        return depth[nid]

    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        cls = mappings[node["class_type"]]
        for slot, (name, spec) in enumerate((n, s) for n, s in _inputs(cls) if not _is_widget(s)):
            v = node["inputs"].get(name)
            if isinstance(v, list):
                src = mappings[api[str(v[0])]["class_type"]]
                links.append([len(links) + 1, ids[str(v[0])], v[1], ids[nid], slot, src.RETURN_TYPES[v[1]]])
                out_links.setdefault((str(v[0]), v[1]), []).append(len(links))
    sizes = {nid: node_size(mappings[n["class_type"]], n.get("_meta", {}).get("title", "")) for nid, n in api.items()}
    widths: dict[int, int] = {}
    for nid in api:
        widths[d(nid)] = max(widths.get(d(nid), 0), sizes[nid][0])
    lefts = {c: MARGIN + sum(widths.get(k, WIDTH) + GAP for k in range(c)) for c in widths}
    tops: dict[int, int] = {}
    for nid in sorted(api, key=lambda n: (d(n), ids[n])):
        node, cls = api[nid], mappings[api[nid]["class_type"]]
        col = d(nid)
        size = sizes[nid]
        top = tops.get(col, MARGIN)
        tops[col] = top + size[1] + TITLE + GAP
        inputs, widgets = [], []
        for name, spec in _inputs(cls):
            if _is_widget(spec):
                v = node["inputs"].get(name, spec[1].get("default") if len(spec) > 1 else None)
                widgets.append(v)
                if spec[1].get("control_after_generate") or name in ("seed", "noise_seed"):
                    widgets.append("fixed")
            else:
                # every socket, connected or not, as the front end saves it: a link's target slot is its index here
                link = next((ln[0] for ln in links if ln[3] == ids[nid] and ln[4] == len(inputs)), None)
                inputs.append({"name": name, "type": spec[0], "link": link})
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        entry = {"id": ids[nid], "type": node["class_type"], "pos": [lefts[col], top + TITLE],
                 "size": size, "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
                 "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            entry["title"] = node["_meta"]["title"]
        nodes.append(entry)
    for order, n in enumerate(sorted(nodes, key=lambda n: (d(next(k for k, v in ids.items() if v == n["id"])),
                                                           n["id"]))):
        n["order"] = order
    nodes.sort(key=lambda n: n["id"])
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


def all_mappings() -> dict:
    from . import NODE_CLASS_MAPPINGS
    from .runner import node_mappings

    return {**node_mappings(), **NODE_CLASS_MAPPINGS}


def _shape(name: str, required: dict, returns: tuple) -> type:
    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: {"required": dict(required)}),
                           "RETURN_TYPES": returns})


_SEED = ("INT", {"default": 0, "min": 0, "max": 2 ** 64 - 1, "control_after_generate": True})
#: ComfyUI's own nodes some examples use around the pack's (their inputs and outputs as ComfyUI 0.8's nodes.py
#: declares them, combos left open): only for laying those examples out and checking their links; the headless
#: runner does not run them, ComfyUI does (tests/test_comfyui.py)
COMFY_SHAPES = {cls.__name__: cls for cls in (
    _shape("CheckpointLoaderSimple", {"ckpt_name": ([], {})}, ("MODEL", "CLIP", "VAE")),
    _shape("CLIPTextEncode", {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})}, ("CONDITIONING",)),
    _shape("EmptyLatentImage", {"width": ("INT", {}), "height": ("INT", {}), "batch_size": ("INT", {})},
           ("LATENT",)),
    _shape("KSampler", {"model": ("MODEL", {}), "seed": _SEED, "steps": ("INT", {}), "cfg": ("FLOAT", {}),
                        "sampler_name": ([], {}), "scheduler": ([], {}), "positive": ("CONDITIONING", {}),
                        "negative": ("CONDITIONING", {}), "latent_image": ("LATENT", {}),
                        "denoise": ("FLOAT", {})}, ("LATENT",)),
    _shape("VAEDecode", {"samples": ("LATENT", {}), "vae": ("VAE", {})}, ("IMAGE",)),
)}


def layout_mappings() -> dict:
    """The classes an example may use: the pack's, the runner's and :data:`COMFY_SHAPES`."""
    return {**COMFY_SHAPES, **all_mappings()}


def needs_comfyui(graph: dict) -> list[str]:
    """The ComfyUI nodes (of :data:`COMFY_SHAPES`) an API-format graph uses: it runs in ComfyUI only."""
    return sorted({n["class_type"] for n in graph.values() if n.get("class_type") in COMFY_SHAPES})


def regenerate(folder: Path = EXAMPLES) -> list[Path]:
    mappings = layout_mappings()
    written = []
    for api_file in sorted((folder / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_file.read_text()), mappings)
        target = folder / api_file.name
        target.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(target)
    return written


#: the template browser's card is square and shows a .jpg of at most 256 px high (contained); twice that is sharp
THUMBNAIL = 512


def _result_images(graph: dict, ui: dict, output: Path) -> list[Path]:
    """The pictures that best stand for what an example makes: what its Compare Grid shows, else what a saved or
    previewed Sample shows, else what the last output node shows."""
    def source_class(nid: str) -> str:
        images = graph[nid].get("inputs", {}).get("images")
        return graph.get(str(images[0]), {}).get("class_type", "") if isinstance(images, list) else ""

    ranked = sorted(ui, key=lambda nid: (source_class(nid) != "FT_CompareGrid", source_class(nid) != "FT_Sample",
                                         -int(nid) if str(nid).isdigit() else 0))
    for nid in ranked:
        paths = [output / ("preview" if image.get("type") == "temp" else "") / image.get("subfolder", "") /
                 image["filename"] for image in ui[nid].get("images", [])]
        if paths and all(p.is_file() for p in paths):
            return paths
    return []


def thumbnail(name: str, target: Path, work: Path, size: int = THUMBNAIL) -> Path:
    """Run the example ``name`` headless on the toy model (its API twin, in ``work``) and write its result (a grid's
    figure, or up to 4 of the pictures it generates, tiled), centred on a white square of ``size`` px, as the JPEG
    ``target``: the template browser's card for the example."""
    from PIL import Image

    from . import runner

    graph = runner.load_workflow(EXAMPLES / "api" / f"{name}.json")
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    pictures = _result_images(graph, runner.run(graph, output_dir=out), out)[:4]
    if not pictures:
        raise RuntimeError(f"example {name} showed no picture")
    shots = [Image.open(p).convert("RGB") for p in pictures]
    cols = 1 if len(shots) == 1 else 2
    rows = -(-len(shots) // cols)
    w, h, gap = max(s.width for s in shots), max(s.height for s in shots), 2 if len(shots) > 1 else 0
    image = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, shot in enumerate(shots):
        image.paste(shot, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    scale = min(size / image.width, size / image.height)
    resample = Image.NEAREST if scale >= 2 else Image.LANCZOS  # the toy's 32 px pictures stay crisp
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    square = Image.new("RGB", (size, size), "white")
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    target.parent.mkdir(parents=True, exist_ok=True)
    square.save(target, "JPEG", quality=90)
    return target


def spectrogram_card(target: Path, size: int = THUMBNAIL) -> Path:
    """The card of the Riffusion example, which needs a checkpoint this pack cannot ship: what its graph draws, a
    ``riffusion_44k_512mel`` spectrogram, here of toy-world tones (a saw arpeggio, pulsing) made in numpy."""
    import numpy as np
    import torch
    from PIL import Image

    from .trainers.audio.names import NOTES
    from .trainers.audio.spectrogram import to_pictures
    from .trainers.audio.world import NOTES as HZ, synth

    rate, rng = 44100, np.random.default_rng(0)
    wave = np.concatenate([synth(HZ[n] * 2, "saw", "four times", rng, sample_rate=rate, length=rate * 128 // 100)
                           for n in NOTES[:4]])
    pictures, _ = to_pictures(torch.from_numpy(wave)[None], rate, "riffusion_44k_512mel")
    card = Image.fromarray((pictures[0].numpy() * 255).round().astype(np.uint8)).resize((size, size))
    target.parent.mkdir(parents=True, exist_ok=True)
    card.save(target, "JPEG", quality=90)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m comfyui_finetune.workflows",
                                     description="Regenerate every example's UI file from its API twin.")
    parser.add_argument("--thumbnails", action="store_true",
                        help="also run every example on the toy model and write its result as <name>.jpg, the "
                             "template browser's thumbnail (a few minutes on a CPU)")
    args = parser.parse_args(argv)
    for p in regenerate():
        print(p.relative_to(EXAMPLES.parent))
    if args.thumbnails:
        with tempfile.TemporaryDirectory() as work:
            for api in sorted((EXAMPLES / "api").glob("*.json")):
                if needs_comfyui(json.loads(api.read_text())):
                    print(f"{api.stem}: needs ComfyUI's own nodes, its card is drawn without running it")
                    target = spectrogram_card(EXAMPLES / f"{api.stem}.jpg")
                else:
                    target = thumbnail(api.stem, EXAMPLES / f"{api.stem}.jpg", Path(work))
                print(target.relative_to(EXAMPLES.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
