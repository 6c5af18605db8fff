"""The house stays readable: the pack's import graph (lazy imports inside functions included) has no circle, the
library (trainers/) never imports nodes/ or ComfyUI, and no library file grows past ~400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
SKIP = {"tests", "benchmarks", "docs", "example_workflows", "web", "configs"}
#: ComfyUI's own top-level modules: the library must not reach for them (nodes/host.py is the one door)
COMFY = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "nodes", "latent_preview"}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACK.rglob("*.py")):
        rel = p.relative_to(PACK)
        if set(rel.parts[:-1]) & SKIP or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _runs(node: ast.AST) -> list[ast.AST]:
    """Statements that run: ``if TYPE_CHECKING:`` blocks are annotations only."""
    out = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            out.extend(child.orelse)
            continue
        out.append(child)
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(pack modules, other top-level modules) that ``name`` imports anywhere in its code."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    ours, others = set(), set()
    stack = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        for child in _runs(node):
            stack.append(child)
            if isinstance(child, ast.Import):
                for a in child.names:
                    top = a.name.split(".")[0]
                    if top == "comfyui_finetune":
                        ours.add(".".join(a.name.split(".")[1:]))
                    else:
                        others.add(top)
            elif isinstance(child, ast.ImportFrom):
                if child.level == 0:
                    mod = child.module or ""
                    if mod.split(".")[0] != "comfyui_finetune":
                        others.add(mod.split(".")[0])
                        continue
                    base = mod.split(".")[1:]
                else:
                    base = package[:len(package) - (child.level - 1)] + (child.module.split(".") if child.module else [])
                for a in child.names:
                    sub = ".".join(base + [a.name])
                    ours.add(sub if sub in known else ".".join(base))
    return {m for m in ours if m in known and m != name}, others


def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: imports(n, p, known)[0] for n, p in known.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    g = graph()
    assert len(g) > 30 and "trainers.loop.training" in g["trainers.methods.lora"]
    assert circles(g) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_nodes_or_comfyui():
    known = modules()
    for name, path in known.items():
        if not name.startswith("trainers"):
            continue
        ours, others = imports(name, path, known)
        assert not [m for m in ours if m.split(".")[0] in ("nodes", "runner", "workflows", "demo")], name
        assert not (others & COMFY), f"{name} imports {others & COMFY}"


def test_the_shell_loads_models_through_the_library():
    """train_cli uses nodes/ only for ComfyUI's folders (host); a model is loaded by trainers.sources."""
    known = modules()
    ours, _ = imports("train_cli", known["train_cli"], known)
    assert {m for m in ours if m.split(".")[0] == "nodes"} <= {"nodes", "nodes.host"}
    assert "trainers.sources" in ours


def test_the_toy_weights_are_found_in_one_place():
    from comfyui_finetune.trainers.families.registry import TOY_WEIGHTS
    from comfyui_finetune.trainers.toy import WEIGHTS

    assert TOY_WEIGHTS == WEIGHTS.resolve() and (TOY_WEIGHTS / "controlnet" / "config.json").is_file()


def test_no_library_file_is_over_400_lines():
    sizes = {p.relative_to(PACK).as_posix(): len(p.read_text().splitlines())
             for name, p in modules().items() if name.startswith(("trainers", "nodes"))}
    big = {k: v for k, v in sizes.items() if v > 420}
    assert not big, big


def test_the_librarys_folders_stack_without_a_circle():
    """trainers/ read as its folders (config/, families/, model/, loop/ ...; a top-level module stands alone): no two
    import each other, even through other folders, so each folder sits above all it uses."""
    def folder(m: str) -> str:
        return ".".join(m.split(".")[:2])

    rooms: dict[str, set[str]] = {}
    for name, deps in graph().items():
        if name.startswith("trainers."):
            rooms.setdefault(folder(name), set()).update(
                folder(d) for d in deps if d.startswith("trainers.") and folder(d) != folder(name))
    assert {"trainers.families", "trainers.model", "trainers.loop", "trainers.toy"} <= set(rooms)
    assert circles(rooms) == []


def test_no_function_is_over_80_lines():
    """A function reads at a glance: none in trainers/ or nodes/ spans more than 80 lines (def to last line)."""
    long = []
    for name, p in modules().items():
        if not name.startswith(("trainers", "nodes")):
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{p.relative_to(PACK).as_posix()}:{node.lineno} {node.name}() is {n} lines")
    assert not long, "split these functions (80 lines at most):\n" + "\n".join(sorted(long))
