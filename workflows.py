"""Example workflows: keep each UI-format file (what the canvas loads) in step with its API-format twin.

    python -m comfyui_finetune.workflows            # regenerate every example_workflows/<name>.json from api/

The API twin is the source of truth (it is what ``POST /prompt`` and the headless runner take); the UI file is
generated from it and the nodes' ``INPUT_TYPES``: widget values in ComfyUI's order (a ``seed`` input is followed
by its "control after generate" value), links, and a left-to-right layout by dependency depth.
"""
from __future__ import annotations

import json
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
    rows: dict[int, int] = {}
    for nid in sorted(api, key=lambda n: (d(n), ids[n])):
        node, cls = api[nid], mappings[api[nid]["class_type"]]
        col = d(nid)
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets = [], []
        for name, spec in _inputs(cls):
            if _is_widget(spec):
                v = node["inputs"].get(name, spec[1].get("default") if len(spec) > 1 else None)
                widgets.append(v)
                if spec[1].get("control_after_generate") or name in ("seed", "noise_seed"):
                    widgets.append("fixed")
            else:
                v = node["inputs"].get(name)
                link = next((ln[0] for ln in links if ln[3] == ids[nid] and ln[4] == len(inputs)), None)
                if link is None and name not in node["inputs"]:
                    continue
                inputs.append({"name": name, "type": spec[0], "link": link})
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        entry = {"id": ids[nid], "type": node["class_type"], "pos": [40 + 380 * col, 40 + 330 * row],
                 "size": [340, 290], "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
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


def regenerate(folder: Path = EXAMPLES) -> list[Path]:
    mappings = all_mappings()
    written = []
    for api_file in sorted((folder / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_file.read_text()), mappings)
        target = folder / api_file.name
        target.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(target)
    return written


if __name__ == "__main__":
    for p in regenerate():
        print(p.relative_to(EXAMPLES.parent))
