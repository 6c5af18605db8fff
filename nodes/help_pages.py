"""Help pages: one Markdown page per node, rendered from the node's own declarations, for ComfyUI's node help panel.

    python -m comfyui_finetune.nodes.help_pages                  # (re)write web/docs/<NodeClass>.md and its pictures

Where the front end looks (comfyui-frontend-package 1.35, ``NodeHelpService.fetchCustomNodeHelp``): for a node whose
``python_module`` is ``custom_nodes.<folder>`` it fetches ``/extensions/<folder>/docs/<NodeClass>/<locale>.md``,
then ``/extensions/<folder>/docs/<NodeClass>.md``, and shows the node's DESCRIPTION with its inputs and outputs when
neither exists. ``/extensions/<folder>/`` serves the pack's WEB_DIRECTORY (``web/``), so the pages live in
``web/docs/``, one per node and locale-free (every language gets the English page rather than none). Relative image
links are resolved against ``/extensions/<folder>/docs/``: pictures must lie in ``web/docs/`` too, so the ones from
``docs/`` are copied into ``web/docs/images/``. Relative links (``<a href>``) are not rewritten (they would resolve
against ComfyUI's page), so a page names its example workflows instead of linking them.

A page holds: the title and node id, the DESCRIPTION, a picture (where ``help_text.PICTURES`` has one), the hand-written
sections of ``help_text.EXTRA`` (the training nodes: what the method is for, first settings, what the node shows), the
inputs (type, default, range or choices, tooltip; advanced and optional ones marked), the outputs, and the template
workflows that use the node. ``tests/test_help_pages.py`` checks that the committed pages are what this renders.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from .help_text import EXTRA, PICTURES, TIPS  # the hand-written parts

PACK = Path(__file__).resolve().parent.parent
DOCS = PACK / "web" / "docs"
#: the pictures' source (the README's figures); a page's copy is DOCS / IMAGES / <name>
PICTURE_SOURCE = PACK / "docs"
IMAGES = "images"
EXAMPLES = PACK / "example_workflows"
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------------------------------ rendering --
def _escape(text: str, table: bool = False) -> str:
    """Text as Markdown that shows as written: outside `code spans`, characters that would become HTML, emphasis or
    strike-through are escaped (a tooltip's ``<my-cat>`` would otherwise be dropped as an unknown tag); in a table
    cell ``|`` is escaped everywhere and line breaks become ``<br>``."""
    parts = str(text).split("`")
    out = []
    for i, part in enumerate(parts):
        code = i % 2 == 1 and i < len(parts) - 1
        if not code:
            part = (part.replace("\\", "\\\\").replace("*", "\\*").replace("~", "\\~")
                    .replace("<", "&lt;").replace(">", "&gt;"))
        if table:
            part = part.replace("|", "\\|")
        out.append(part)
    text = "`".join(out)
    return text.replace("\r\n", "\n").replace("\n", "<br>") if table else text


def _num(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return "2^64 − 1" if v == MAX_SEED else str(v)
    if isinstance(v, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].replace('+', '')}{m[2]}", f"{v:g}")
    return str(v)


def _code(v: str) -> str:
    v = str(v)
    fence = "``" if "`" in v else "`"
    return f"{fence} {v} {fence}" if fence == "``" else f"`{v}`"


class _Listing:
    """Stand-in for the model and input folders while a node's inputs are read: each lists ``names``."""

    def __init__(self, names: list[str]):
        self.names = names

    def list_models(self, *args, **kwargs) -> list[str]:
        return list(self.names)

    def input_subfolders(self, *args, **kwargs) -> list[str]:
        return list(self.names)


@contextlib.contextmanager
def _folders_listing(names: list[str]) -> Iterator[None]:
    from . import host

    saved = host.list_models, host.input_subfolders
    listing = _Listing(names)
    host.list_models, host.input_subfolders = listing.list_models, listing.input_subfolders
    try:
        yield
    finally:
        host.list_models, host.input_subfolders = saved


PROBE = "\x00probe"


def _specs(cls) -> tuple[dict, set[str]]:
    """The node's INPUT_TYPES as written, read with empty folders (a page must not list the files of the machine
    that rendered it), and the names of the inputs whose choices come from a folder (they change with its files)."""
    with _folders_listing([]):
        empty = cls.INPUT_TYPES()
    with _folders_listing([PROBE]):
        probed = cls.INPUT_TYPES()
    dynamic = set()
    for section in ("required", "optional"):
        for name, spec in empty.get(section, {}).items():
            other = probed.get(section, {}).get(name)
            if isinstance(spec[0], (list, tuple)) and other is not None and list(other[0]) != list(spec[0]):
                dynamic.add(name)
                spec = (tuple(c for c in spec[0] if c in other[0]), *spec[1:])
                empty[section][name] = spec
    return empty, dynamic


def _input_row(name: str, spec: tuple, optional: bool, dynamic: bool) -> str:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    marks = [m for m, on in (("optional", optional), ("advanced", opts.get("advanced"))) if on]
    label = _code(name) + (f" <br>*{', '.join(marks)}*" if marks else "")
    default, allowed = "", ""
    if isinstance(kind, (list, tuple)):
        type_name, choices = "choice", [_code(c) for c in kind]
        allowed = ", ".join(choices)
        if dynamic:
            allowed += (", then " if choices else "") + "the files or folders ComfyUI finds for it (listed when " \
                "ComfyUI starts; the tooltip says where)"
        d = opts.get("default")
        default = _code(d) if d is not None and d in kind else ""
    elif kind in ("INT", "FLOAT"):
        type_name = kind
        d = opts.get("default")
        default = _num(d) if d is not None else ""
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None or hi is not None:
            allowed = f"{_num(lo) if lo is not None else '−∞'} – {_num(hi) if hi is not None else '∞'}"
    elif kind == "BOOLEAN":
        type_name = kind
        default = _num(bool(opts.get("default", False)))
    elif kind == "STRING":
        type_name = kind + (" (multiline)" if opts.get("multiline") else "")
        d = opts.get("default", "")
        default = _code(d.replace("\n", " ⏎ ")) if d else "*(empty)*"
    else:  # a link from another node's output
        type_name = f"`{kind}` (link)"
    tooltip = _escape(opts.get("tooltip", ""), table=True)
    return f"| {label} | {type_name} | {default} | {allowed} | {tooltip} |"


def example_uses(folder: Path = EXAMPLES) -> dict[str, list[str]]:
    """node class -> the example workflows (template names) that use it, from their API-format twins."""
    uses: dict[str, list[str]] = {}
    for path in sorted((folder / "api").glob("*.json")):
        graph = json.loads(path.read_text(encoding="utf-8"))
        for cls in sorted({n.get("class_type") for n in graph.values() if isinstance(n, dict)} - {None}):
            uses.setdefault(cls, []).append(path.stem)
    return uses


def node_page(cls, display_name: str | None = None, uses: dict[str, list[str]] | None = None) -> str:
    """The Markdown help page of node class ``cls``, from its declarations and this module's tables."""
    node_id = cls.__name__
    uses = example_uses() if uses is None else uses
    title = display_name or node_id
    head = f"`{node_id}` · category `{getattr(cls, 'CATEGORY', '')}`"
    if getattr(cls, "OUTPUT_NODE", False):
        head += " · output node (it runs even when nothing is connected to it)"
    lines = [f"# {_escape(title)}", "", head, "", _escape(getattr(cls, "DESCRIPTION", "") or "").strip(), ""]
    if node_id in PICTURES:
        file, caption = PICTURES[node_id]
        lines += [f"![{_escape(caption)}]({IMAGES}/{file})", "", f"*{_escape(caption)}*", ""]
    if node_id in EXTRA:
        lines += [EXTRA[node_id].strip(), ""]

    spec, dynamic = _specs(cls)
    rows = [_input_row(n, s, section == "optional", n in dynamic)
            for section in ("required", "optional") for n, s in spec.get(section, {}).items()]
    lines += ["## Inputs", ""]
    if rows:
        lines += ["| input | type | default | range or choices | what it does |", "| --- | --- | --- | --- | --- |",
                  *rows, ""]
    else:
        lines += ["None.", ""]

    types = tuple(getattr(cls, "RETURN_TYPES", ()))
    names = tuple(getattr(cls, "RETURN_NAMES", ()) or types)
    tips = tuple(getattr(cls, "OUTPUT_TOOLTIPS", ()) or ())
    lines += ["## Outputs", ""]
    if types:
        lines += ["| output | type | what it is |", "| --- | --- | --- |"]
        for i, (n, t) in enumerate(zip(names, types)):
            lines.append(f"| {_code(n)} | `{t}` | {_escape(tips[i] if i < len(tips) else '', table=True)} |")
        lines.append("")
    else:
        lines += ["None.", ""]

    if node_id in TIPS:
        lines += ["## Tip", "", TIPS[node_id], ""]
    used = uses.get(node_id, [])
    lines += ["## Example workflows", ""]
    if used:
        lines += [("Open them from **Workflow → Browse Templates**, under the pack's name among the extensions (the "
                   "files are in the pack's `example_workflows/`); they run on the built-in toy model, on a CPU:"), ""]
        lines += [f"- **{name}** (`example_workflows/{name}.json`)" for name in used]
    else:
        lines += ["None of the pack's templates uses this node yet."]
    return "\n".join(lines).rstrip() + "\n"


def all_nodes(extra: Iterable = ()) -> list[tuple[type, str]]:
    """(class, display name) of every node in NODES, the bridges (registered only inside ComfyUI, documented
    everywhere), then ``extra`` (classes, or (class, display name) pairs)."""
    from . import BRIDGES, NODES

    out, seen = [], set()
    for item in [*NODES, *BRIDGES, *extra]:
        cls, name = item if isinstance(item, tuple) else (item, None)
        if cls.__name__ not in seen:
            seen.add(cls.__name__)
            out.append((cls, name or cls.__name__))
    return out


def pages(extra: Iterable = ()) -> dict[str, str]:
    """file name in web/docs -> page text, for every node of :func:`all_nodes`."""
    uses = example_uses()
    return {f"{cls.__name__}.md": node_page(cls, name, uses) for cls, name in all_nodes(extra)}


def pictures() -> dict[str, Path]:
    """path in web/docs (``images/<file>``) -> the source picture in docs/."""
    return {f"{IMAGES}/{file}": PICTURE_SOURCE / file for file, _ in PICTURES.values()}


def write_pages(folder: Path = DOCS, extra: Iterable = ()) -> list[Path]:
    """(Re)write every node's page and copy its pictures; pages of nodes not known here are left alone (a node
    registered only inside ComfyUI has its page written where it is importable)."""
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in pages(extra).items():
        target = folder / name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8", newline="\n")
        written.append(target)
    for rel, source in pictures().items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
        written.append(target)
    return written


# ------------------------------------------------------------------------------------------- thumbnails --
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfyui_finetune.nodes.help_pages",
                                     description="Write the nodes' help pages into web/docs/.")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the pages (default: the pack's web/docs)")
    args = parser.parse_args(argv)
    for path in write_pages(args.out):
        print(path.relative_to(args.out.parent) if args.out.parent in path.parents else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
