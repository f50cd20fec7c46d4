"""The packages import one way -- llama3_sae (base) <- llama3 <- sae <- capture <- training <- interpret <- apps --
and no module imports another that imports it back (directly or through others), wherever the import sits
in the file; and project imports sit at the top of their module. Read from the source with ``ast``, so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("llama3_sae", "llama3", "sae", "capture", "training", "interpret", "apps")
RANK = {name: i for i, name in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (``from .x import y`` resolved; a
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # The longest known module that t names (t itself, or a package above it).
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for type hints only never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def test_no_module_imports_a_later_stage():
    upward = []
    for mod, deps in _graph().items():
        for dep in deps:
            if RANK[dep.split(".")[0]] > RANK[mod.split(".")[0]]:
                upward.append(f"{mod} imports {dep}")
    assert not upward, "imports against the stage order " + " <- ".join(LAYERS) + ":\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exports its modules; a module importing its own package's __init__ (for a
    # public name) is not a cycle of the code's design, so edges into a package's own __init__ are left out.
    edges = {m: {d for d in deps if not (m.startswith(d + "."))} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _imports_inside_functions(path: Path) -> list[int]:
    """Lines of project imports inside a function (they hide the real graph; the stages import at the top)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in RANK):
                    lines.append(node.lineno)
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in RANK for a in node.names):
                    lines.append(node.lineno)
    return lines


def test_project_imports_sit_at_module_top():
    lazy = [f"{path.relative_to(REPO)}:{line}" for path in _modules().values() for line in _imports_inside_functions(path)]
    assert not lazy, "project imports inside functions (move them to the top of the module):\n" + "\n".join(lazy)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The test has teeth: a relative import inside a function is found and resolved.
    mods = _modules()
    deps = _imports("sae.model", mods["sae.model"], set(mods))
    assert "sae.config" in deps and "sae.sparse" in deps
    lazy = tmp_path / "lazy.py"
    lazy.write_text("import torch\n\ndef f():\n    import os\n    from .model import X\n    from sae import io\n")
    assert _imports_inside_functions(lazy) == [5, 6]
