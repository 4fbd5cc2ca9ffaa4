"""The package's shape: module-level imports form no cycle, files stay readable in length, and
every method file registers its method (none can be silently left out)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import subnet_interp as si

PACKAGE = Path(si.__file__).parent
MAX_LINES = 500
# Files allowed over MAX_LINES, with the reason (keep this short).
LONG_FILES: dict[str, str] = {  # to split next (session 8's bug fixes pushed them over)
    "subnet_interp/_subnetwork.py": "Subnetwork and its file format (digest); split storage out",
    "subnet_interp/_find.py": "si.find's argument checks and restore; move checks to _find_checks",
    "subnet_interp/analysis/circuits.py": "Circuit plus comparisons; split comparisons out",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: at module level, also inside
    module-level ``if`` / ``try`` blocks, but not ``if TYPE_CHECKING:`` or function bodies."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                pending.extend(handler.body)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``subnet_interp`` modules it imports at import time."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                for base in bases:
                    if base in modules:
                        edges.add(base)
                continue
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base not in modules:
                continue
            submodules = {f"{base}.{a.name}" for a in node.names} & set(modules)
            edges |= submodules
            if len(submodules) < len(node.names):  # a name defined by `base` itself
                edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    assert "subnet_interp._subnetwork" in graph["subnet_interp"]
    assert "subnet_interp._types" in graph["subnet_interp.adapters"]


def test_no_import_cycles_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_file_is_too_long_to_read():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    unexplained = {path: n for path, n in long.items() if path not in LONG_FILES}
    assert not unexplained, f"files over {MAX_LINES} lines (split them, or say why): {unexplained}"


def test_every_method_file_registers_a_method():
    registered_in = {si.methods.get(name).__module__ for name in si.methods.names()}
    for path in sorted((PACKAGE / "methods").glob("[!_]*.py")):
        module = f"subnet_interp.methods.{path.stem}"
        importlib.import_module(module)
        assert module in registered_in, f"{path.name} registers no method (or is not imported)"
