"""The API reference site: every public name has a docstring and a place on an API page, and
``mkdocs build --strict`` passes (skipped where the ``docs`` extra is not installed)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import subnet_interp as si
from subnet_interp import adapters

ROOT = Path(__file__).resolve().parent.parent
API_PAGES = ROOT / "docs" / "api"
# Modules whose ``__all__`` is public API (importing none of them needs an optional extra).
PUBLIC_MODULES = (
    "subnet_interp",
    "subnet_interp.analysis",
    "subnet_interp.analysis.circuit_formats",
    "subnet_interp.methods",
    "subnet_interp.probing",
    "subnet_interp.objectives",
    "subnet_interp.testing",
    "subnet_interp.tasks",
    "subnet_interp.tasks.tracr",
    "subnet_interp.tasks.tracr_library",
    "subnet_interp.adapters",
)
_DIRECTIVE = re.compile(r"^::: *(\S+)\s*$", re.MULTILINE)


def public_objects() -> dict[str, object]:
    """Public path -> object: the ``__all__`` of every public module, every registered method's
    class and every built-in adapter's class."""
    found: dict[str, object] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            found[f"{module_name}.{name}"] = getattr(module, name)
    for name in si.methods.names():
        cls = si.methods.get(name)
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for adapter in adapters._ADAPTERS:
        cls = type(adapter)
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def _is_data(obj: object) -> bool:
    """A constant (documented by a string literal after its assignment), not code nor an
    instance of one of the package's classes (documented by its class)."""
    return not (
        inspect.ismodule(obj)
        or inspect.isclass(obj)
        or callable(obj)
        or type(obj).__module__.startswith("subnet_interp")
    )


def _own_docstring(obj: object) -> str:
    """``obj``'s docstring, without the signature dataclasses write when a class has none (an
    instance of a package class: its class's)."""
    if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
        obj = type(obj)
    doc = getattr(obj, "__doc__", None) or ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        if doc.startswith(f"{obj.__name__}("):
            return ""
    return doc.strip()


def _documented_constants() -> set[str]:
    """Names assigned at module level in the package and followed by a docstring."""
    names = set()
    for path in Path(si.__file__).parent.rglob("*.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for statement, following in zip(body, body[1:], strict=False):
            documented = (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            )
            if isinstance(statement, ast.Assign) and documented:
                names |= {t.id for t in statement.targets if isinstance(t, ast.Name)}
            elif isinstance(statement, ast.AnnAssign) and documented:
                if isinstance(statement.target, ast.Name):
                    names.add(statement.target.id)
    return names


def _member_docstring(cls: type, name: str) -> str:
    """The docstring of ``cls.name`` or of the same member in a base class (as
    ``inspect.getdoc``, and the site, inherit them)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            member = vars(klass)[name]
            member = member.fget if isinstance(member, property) else member
            member = getattr(member, "__func__", member)
            if (doc := (getattr(member, "__doc__", None) or "").strip()) != "":
                return doc
    return ""


def _public_members(cls: type) -> list[str]:
    """Methods and properties ``cls`` defines itself and does not keep private (dataclass
    fields are documented in the class docstring)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    members = []
    for name, member in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(member):
            members.append(name)
    return members


def test_every_public_name_has_a_docstring():
    constants = _documented_constants()
    missing = []
    for path, obj in public_objects().items():
        name = path.rpartition(".")[2]
        if _is_data(obj):
            if name not in constants:
                missing.append(f"{path} (a string literal on the line after its assignment)")
        elif not _own_docstring(obj):
            missing.append(path)
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_every_public_method_and_property_has_a_docstring():
    missing = []
    for path, obj in public_objects().items():
        if inspect.isclass(obj) and obj.__module__.startswith("subnet_interp"):
            missing += [
                f"{path}.{m}" for m in _public_members(obj) if not _member_docstring(obj, m)
            ]
    assert not missing, "public members without a docstring:\n" + "\n".join(sorted(set(missing)))


def _resolve(identifier: str) -> object:
    """The object an API page's ``::: identifier`` documents, found by importing."""
    first, *rest = identifier.split(".")
    obj = importlib.import_module(first)
    path = first
    for part in rest:
        path = f"{path}.{part}"
        if inspect.ismodule(obj) and not hasattr(obj, part):
            importlib.import_module(path)  # a submodule not imported by its package
        obj = getattr(obj, part)
    return obj


def api_page_identifiers() -> dict[str, str]:
    """``::: identifier`` of every API page -> the page's name."""
    found = {}
    for page in sorted(API_PAGES.glob("*.md")):
        for identifier in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            assert identifier not in found, (
                f"{identifier} is on {found[identifier]} and {page.name}"
            )
            found[identifier] = page.name
    return found


def test_every_api_page_entry_exists():
    for identifier, page in api_page_identifiers().items():
        try:
            _resolve(identifier)
        except (ImportError, AttributeError) as error:  # the message names the part
            pytest.fail(f"docs/api/{page}: `::: {identifier}` names nothing ({error})")


def test_every_public_name_is_on_an_api_page():
    identifiers = api_page_identifiers()
    on_pages = {id(_resolve(identifier)) for identifier in identifiers}
    missing = []
    for path, obj in public_objects().items():
        if _is_data(obj):
            # constants are matched by name: equal small values may be one object
            covered = path in identifiers
        else:
            # a name re-exported in several places is documented once; a registry's bound
            # methods (si.methods.names, ...) are documented on their class
            owner = getattr(obj, "__self__", obj if not callable(obj) else None)
            covered = id(obj) in on_pages or (owner is not None and id(type(owner)) in on_pages)
        if not covered:
            missing.append(path)
    assert not missing, (
        "public names on no page of docs/api/ (add a `::: path` line to the right page):\n"
        + "\n".join(missing)
    )


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is needed")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is needed")
    pytest.importorskip("material", reason="the docs extra is needed")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "subnet_interp" in index
    for page in ("tutorials/01_quickstart.html", "api/core.html", "design.html"):
        assert (tmp_path / page).is_file(), page
    # the pages load nothing from the network (no web fonts, scripts or styles from a CDN)
    for page in tmp_path.rglob("*.html"):
        remote = re.findall(
            r"<(?:script|link)[^>]*(?:src|href)=\"(?:https?:)?//[^\"]*", page.read_text()
        )
        assert not remote, f"{page.relative_to(tmp_path)} loads {remote}"


def _hooks():
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is needed")
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tutorial_becomes_a_page_of_text_and_code_blocks():
    source = "# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n# %%\nx = 1\n\n# %%\nprint(x)\n"
    page = _hooks().tutorial_page(source, "01_demo.py")
    assert page.startswith("# Title\n")
    assert "Some *text*." in page and "`tutorials/01_demo.py`" in page
    assert "```python\nx = 1\n```" in page and "```python\nprint(x)\n```" in page
    assert "# %%" not in page


def test_readme_links_point_at_site_pages():
    hooks = _hooks()
    text = "[a](tutorials/01_quickstart.py) [b](docs/design.md#layers) [c](https://x.org/a.py)"
    assert hooks.readme_page(text) == (
        "[a](tutorials/01_quickstart.md) [b](design.md#layers) [c](https://x.org/a.py)"
    )
    with pytest.raises(ValueError, match="no page on the docs site"):
        hooks.readme_page("[d](benchmarks/mask_memory.py)")
