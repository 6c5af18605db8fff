"""Run an API-format ComfyUI workflow made of this pack's nodes, without a ComfyUI server.

The workflow is the JSON that ComfyUI's "Export (API)" writes and ``POST /prompt`` takes::

    {"3": {"class_type": "FT_Sample", "inputs": {"steps": 20, "model": ["1", 0]}, "_meta": {"title": "..."}}, ...}

The runner follows ComfyUI's classic node API (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, ``OUTPUT_NODE``):
it checks the whole workflow first and reports every problem at once (:func:`validate`), then runs only the output
nodes and their ancestors, each once, in dependency order (:func:`run`). Besides the pack's nodes it provides four
core ComfyUI nodes (core_nodes.py): SaveImage and PreviewImage, and for sound SaveAudio and PreviewAudio.
Importing this module imports no torch.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .core_nodes import PreviewAudio, PreviewImage, SaveAudio, SaveImage  # noqa: F401  (runner.SaveImage, ...)

log = logging.getLogger(__name__)

PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN")
#: Hidden input kinds ComfyUI fills in, by the value in INPUT_TYPES()["hidden"] (and the usual parameter name).
_HIDDEN = {"UNIQUE_ID": "unique_id", "PROMPT": "prompt", "EXTRA_PNGINFO": "extra_pnginfo", "DYNPROMPT": "dynprompt"}
_CORE = "SaveImage, PreviewImage, SaveAudio, PreviewAudio"


class WorkflowError(ValueError):
    """The workflow cannot run as written; the message lists every problem, one per line."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class NodeExecutionError(RuntimeError):
    """A node raised while running; ``__cause__`` is the original exception."""

    def __init__(self, node_id: str, class_type: str, cause: BaseException):
        self.node_id, self.class_type = node_id, class_type
        super().__init__(f"node {node_id} ({class_type}) failed: {str(cause) or type(cause).__name__}")


# ------------------------------------------------------------------------------------------------ loading --
def load_workflow(path: str | Path) -> dict:
    """Read an API-format workflow (also accepts the ``{"prompt": {...}}`` body of ``POST /prompt``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise WorkflowError(f"cannot read the workflow {p}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{p} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(
            f"{p} is a ComfyUI UI-format workflow (the editor's graph, with 'nodes' and 'links'); the runner needs "
            "the API format: use the workflow's API-format twin (example_workflows/api/), or open it in ComfyUI "
            "and use Workflow > Export (API)")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{p} holds no workflow: expected a JSON object mapping node ids to nodes")
    return data


def node_mappings() -> dict[str, type]:
    """The pack's node classes plus the runner's stand-ins for ComfyUI's SaveImage, PreviewImage, SaveAudio and
    PreviewAudio."""
    from . import NODE_CLASS_MAPPINGS

    return {**NODE_CLASS_MAPPINGS, "SaveImage": SaveImage, "PreviewImage": PreviewImage, "SaveAudio": SaveAudio,
            "PreviewAudio": PreviewAudio}


# --------------------------------------------------------------------------------------------- validation --
@dataclass
class _Spec:
    """One declared input: whether it is required, its type (a name, or the allowed values of a combo), options."""
    required: bool
    type: str | list
    options: dict = field(default_factory=dict)


def _specs(cls: type) -> tuple[dict[str, _Spec], dict[str, str]]:
    """(declared required/optional inputs, hidden inputs name -> kind) from ``cls.INPUT_TYPES()``."""
    types = cls.INPUT_TYPES()
    inputs: dict[str, _Spec] = {}
    for cat in ("required", "optional"):
        for name, spec in (types.get(cat) or {}).items():
            spec = (spec,) if isinstance(spec, str) else tuple(spec)
            typ, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if typ == "COMBO" and "options" in opts:  # the newer spelling of a combo
                typ = opts["options"]
            inputs[name] = _Spec(cat == "required", list(typ) if isinstance(typ, (list, tuple)) else typ, opts)
    return inputs, dict(types.get("hidden") or {})


def _types_match(out_type: Any, in_type: str | list) -> bool:
    """ComfyUI's rule: equal names, '*' on either side, or a shared member of comma-separated unions."""
    out_type = "COMBO" if isinstance(out_type, (list, tuple)) else str(out_type)
    if isinstance(in_type, list):  # a combo input takes a STRING or combo output
        return out_type in ("STRING", "COMBO", "*")
    a, b = set(out_type.split(",")), set(in_type.split(","))
    return "*" in a or "*" in b or bool(a & b)


def _check_literal(typ: str | list, opts: Mapping, value: Any) -> tuple[Any, str | None]:
    """(the value as the node gets it, or an error message) for a widget value typed into the workflow."""
    if isinstance(typ, list):
        if value in typ:
            return value, None
        if not typ:
            return value, f"{value!r} is not allowed: the list of choices is empty (are the files in place?)"
        shown = ", ".join(repr(v) for v in typ[:10]) + (f", ... ({len(typ)} in all)" if len(typ) > 10 else "")
        return value, f"{value!r} is not one of the allowed values: {shown}"
    if typ == "INT":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{value!r} is not an integer"
    elif typ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{value!r} is not a number"
        value = float(value)
    elif typ == "STRING" and not isinstance(value, str):
        return value, f"{value!r} is not a string"
    elif typ == "BOOLEAN" and not isinstance(value, bool):
        return value, f"{value!r} is not true or false"
    elif typ not in PRIMITIVES:
        return value, f"{typ} inputs must be linked to another node's output; it is given the value {value!r}"
    if typ in ("INT", "FLOAT"):
        if opts.get("min") is not None and value < opts["min"]:
            return value, f"{value!r} is below the minimum {opts['min']}"
        if opts.get("max") is not None and value > opts["max"]:
            return value, f"{value!r} is above the maximum {opts['max']}"
    return value, None


def _validated_by_node(cls: type) -> set[str]:
    """The inputs a node's ``VALIDATE_INPUTS`` names: ComfyUI skips its own type and combo checks for them and asks
    the node instead (the pack's trainers read older spellings of a combo this way)."""
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    return set(inspect.signature(fn).parameters) if fn is not None else set()


def _order_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _find_cycles(deps: Mapping[str, list[str]]) -> list[list[str]]:
    """Cycles in the dependency graph (node -> the nodes it takes inputs from), each as a list of node ids."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles: list[list[str]] = []
    for root in sorted(deps, key=_order_key):
        if root in state:
            continue
        state[root], stack = 1, [(root, iter(deps[root]))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif nxt in deps and state.get(nxt) == 1:
                path = [n for n, _ in stack]
                cycles.append(path[path.index(nxt):])
            elif nxt in deps and nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return cycles


def _analyse(prompt: Any, mappings: Mapping[str, type]) -> tuple[list[str], dict, dict[str, list[str]]]:
    """(errors, node id -> (input specs, hidden specs), node id -> ids of the nodes it takes inputs from)."""
    if not isinstance(prompt, dict):
        return ["the workflow must be a JSON object mapping node ids to nodes"], {}, {}
    errors: list[str] = []
    specs: dict[str, tuple[dict[str, _Spec], dict[str, str]]] = {}
    for nid, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            errors.append(f"node {nid}: not a node (expected an object with 'class_type' and 'inputs')")
        elif node["class_type"] not in mappings:
            errors.append(f"node {nid} ({node['class_type']}): unknown node type {node['class_type']!r}: it is not "
                          f"one of this pack's nodes nor one of the core nodes the runner provides ({_CORE}); "
                          "for other ComfyUI core nodes, install the pack in ComfyUI and run the workflow there")
        else:
            try:
                specs[nid] = _specs(mappings[node["class_type"]])
            except Exception as e:  # noqa: BLE001 - reported, not raised
                errors.append(f"node {nid} ({node['class_type']}): INPUT_TYPES() failed: {e}")
    deps: dict[str, list[str]] = {}
    for nid, (inputs, _hidden) in specs.items():
        node, where = prompt[nid], f"node {nid} ({prompt[nid]['class_type']})"
        deps[nid] = []
        for name, spec in inputs.items():
            value = node.get("inputs", {}).get(name)
            if value is None:
                if spec.required:
                    errors.append(f"{where}: input '{name}': required input is missing (give it a value or a link)")
            elif isinstance(value, list):  # a link: [source node id, output index]
                if len(value) != 2 or isinstance(value[1], bool) or not isinstance(value[1], int):
                    errors.append(f"{where}: input '{name}': malformed link {value!r}; expected [node id, index]")
                    continue
                src, idx = str(value[0]), value[1]
                if src not in prompt:
                    errors.append(f"{where}: input '{name}': linked to node {src!r}, which is not in the workflow")
                    continue
                deps[nid].append(src)
                if src not in specs:  # the source itself is broken; already reported
                    continue
                src_cls = mappings[prompt[src]["class_type"]]
                returns = tuple(getattr(src_cls, "RETURN_TYPES", ()))
                src_where = f"node {src} ({prompt[src]['class_type']})"
                if not 0 <= idx < len(returns):
                    errors.append(f"{where}: input '{name}': linked to output {idx} of {src_where}, which has "
                                  f"{len(returns)} output(s)")
                elif not _types_match(returns[idx], spec.type):
                    want = "a combo" if isinstance(spec.type, list) else spec.type
                    errors.append(f"{where}: input '{name}': expects {want} but is linked to output {idx} of "
                                  f"{src_where}, which is {returns[idx]}")
            elif name in _validated_by_node(mappings[node["class_type"]]):  # ComfyUI leaves these to the node
                verdict = mappings[node["class_type"]].VALIDATE_INPUTS(**{name: value})
                if verdict is not True:
                    errors.append(f"{where}: input '{name}': {verdict or 'refused by the node'}")
            else:
                _, problem = _check_literal(spec.type, spec.options, value)
                if problem:
                    errors.append(f"{where}: input '{name}': {problem}")
    for cycle in _find_cycles(deps):
        chain = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in cycle + cycle[:1])
        errors.append(f"nodes {chain} form a cycle (each takes an input from the next); remove one of these links")
    if not any(getattr(mappings[prompt[n]["class_type"]], "OUTPUT_NODE", False) for n in specs):
        errors.append("the workflow has no output node (SaveImage, PreviewImage or a pack node that saves); "
                      "nothing would run")
    return errors, specs, deps


def validate(prompt: dict, mappings: Mapping[str, type] | None = None) -> list[str]:
    """Every problem in ``prompt`` (an API-format workflow), one message each; empty when it can run."""
    return _analyse(prompt, node_mappings() if mappings is None else mappings)[0]


# ---------------------------------------------------------------------------------------------- execution --
def _execution_order(prompt: dict, mappings: Mapping[str, type], deps: Mapping[str, list[str]]) -> list[str]:
    """Output nodes and their ancestors, each after the nodes it takes inputs from (the graph has no cycles)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(nid: str) -> None:
        if nid not in seen:
            seen.add(nid)
            for src in deps[nid]:
                visit(src)
            order.append(nid)

    for nid in sorted(deps, key=_order_key):
        if getattr(mappings[prompt[nid]["class_type"]], "OUTPUT_NODE", False):
            visit(nid)
    return order


def run(prompt: dict, mappings: Mapping[str, type] | None = None, *,
        output_dir: str | Path | None = None) -> dict[str, dict]:
    """Validate, then run the workflow; returns ``{node id: ui dict}`` for the nodes that returned a "ui".

    Raises :class:`WorkflowError` listing every problem before anything runs, or :class:`NodeExecutionError`
    when a node fails. ``output_dir`` sets the output folder (else ``host.output_dir()`` is used).
    """
    from .nodes import host

    if output_dir is not None:
        host.set_folders(output=output_dir)
    mappings = node_mappings() if mappings is None else mappings
    errors, specs, deps = _analyse(prompt, mappings)
    if errors:
        raise WorkflowError(errors)
    outputs: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    for nid in _execution_order(prompt, mappings, deps):
        class_type = prompt[nid]["class_type"]
        cls, (inputs, hidden), given = mappings[class_type], specs[nid], prompt[nid].get("inputs", {})
        kwargs: dict[str, Any] = {}
        for name, spec in inputs.items():
            value = given.get(name)
            if isinstance(value, list):
                kwargs[name] = outputs[str(value[0])][value[1]]
            elif value is not None:
                kwargs[name] = _check_literal(spec.type, spec.options, value)[0]
        for name, kind in hidden.items():
            kind = kind if kind in _HIDDEN else {v: k for k, v in _HIDDEN.items()}.get(name)
            kwargs[name] = nid if kind == "UNIQUE_ID" else prompt if kind == "PROMPT" else None
        log.debug("node %s (%s) starting", nid, class_type)
        start = time.perf_counter()
        try:
            with host.executing_node(nid):
                result = getattr(cls(), cls.FUNCTION)(**kwargs)
                if isinstance(result, dict):
                    if result.get("ui") is not None:
                        ui[nid] = result["ui"]
                    result = result.get("result", ())
                result = () if result is None else result
                n_out = len(getattr(cls, "RETURN_TYPES", ()))
                if not isinstance(result, (tuple, list)) or len(result) < n_out:
                    raise TypeError(f"it returned {type(result).__name__} {result!r:.80}; expected a tuple of "
                                    f"{n_out} output(s) ({', '.join(map(str, cls.RETURN_TYPES)) or 'none'})")
        except Exception as e:
            raise NodeExecutionError(nid, class_type, e) from e
        outputs[nid] = tuple(result)
        log.info("node %s (%s) done in %.2f s", nid, class_type, time.perf_counter() - start)
    return ui


# ---------------------------------------------------------------------------------------------------- CLI --
def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m comfyui_finetune run``."""
    from .flags import named

    parser.add_argument("workflow", help="an API-format workflow JSON (in ComfyUI: Workflow > Export (API))")
    parser.add_argument("--out", type=named, default="./output",
                        help="output folder (ComfyUI's output/; default ./output)")
    parser.add_argument("--input", type=named, default=None, help="input folder (ComfyUI's input/; default ./input)")
    parser.add_argument("--models", type=named, default=None,
                        help="models folder holding checkpoints/, loras/, ... (ComfyUI's models/; default ./models)")


def main_run(args: argparse.Namespace) -> int:
    """Run an API-format workflow without ComfyUI and print where each image was saved.

    Returns the exit code: 0 done, 2 the workflow is invalid (nothing ran), 1 a node failed.
    """
    from .nodes import host

    host.set_folders(input=args.input, output=args.out, models=args.models)
    try:
        prompt = load_workflow(args.workflow)
        results = run(prompt)
    except WorkflowError as e:
        print(f"error: the workflow {args.workflow} cannot run:\n{e}", file=sys.stderr)
        return 2
    except NodeExecutionError as e:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exception(e.__cause__ or e, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    out, n = host.output_dir(), 0
    for nid, ui in results.items():
        for image in ui.get("images") or []:
            root = out / "preview" if image.get("type") == "temp" else out
            path = root / image.get("subfolder", "") / image["filename"]
            print(f"node {nid} ({prompt[nid]['class_type']}): saved {path}")
            n += 1
    if not n:
        print("the workflow ran; it saved no images")
    return 0
