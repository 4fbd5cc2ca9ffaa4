"""The training code's layout: interface, loop, distributed helpers and checkpoints in their own
modules, with no import cycle through them."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "subnet_interp"
SPLIT = (
    "subnet_interp._checkpoint",
    "subnet_interp._distributed",
    "subnet_interp._loop",
    "subnet_interp._train",
    "subnet_interp.methods",
    "subnet_interp.methods._base",
    "subnet_interp.methods._weights",
)


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module-level imports among the package's modules (``from . import x`` and
    ``from .x import y`` alike; importing a submodule counts as importing its packages)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        pending = list(ast.parse(path.read_text()).body)
        while pending:
            node = pending.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # imported when called: no cycle at import time
            pending.extend(ast.iter_child_nodes(node))
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = [node.module] if node.module else []
                source = ".".join(base + module) if node.level else node.module or ""
                subs = {f"{source}.{a.name}" for a in node.names} & set(known)
                targets = subs | ({source} if node.module and source in known else set())
            elif isinstance(node, ast.Import):
                targets = {a.name for a in node.names} & set(known)
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for end in range(2, len(parts) + 1):
                    parent = ".".join(parts[:end])
                    if parent in known and not name.startswith(parent + ".") and parent != name:
                        graph[name].add(parent)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    pending = list(graph[start])
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending.extend(graph[module])
    return seen


def test_no_import_cycle_through_the_training_modules():
    graph = import_graph()
    cyclic = [name for name in SPLIT if name in reachable(graph, name)]
    assert not cyclic, cyclic


def test_the_method_interface_does_not_import_the_loop():
    graph = import_graph()
    assert "subnet_interp._train" not in reachable(graph, "subnet_interp.methods._base")
    assert "subnet_interp._train" not in reachable(graph, "subnet_interp.methods")


def test_training_modules_stay_small():
    known = modules()
    sizes = {name: len(known[name].read_text().splitlines()) for name in SPLIT}
    assert max(sizes.values()) <= 500, sizes
