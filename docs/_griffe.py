"""A griffe extension for the API pages (mkdocs.yml names it; it changes no code, only what the
site shows).

- Sphinx roles in docstrings (``:class:`Probe```, ``:func:`~subnet_interp.analysis.overlap```,
  ``:meth:`title <target>```) become code spans that link to the object where the site
  documents it; the name is resolved like Python would from the docstring's own scope.
  A role that resolves to nothing on the site stays plain code (a role is not a checked
  reference; explicit markdown references ``[name][path]`` are, and fail a strict build).
- A method or property that overrides a documented one of a base class without a docstring of
  its own shows the base class's docstring (as ``inspect.getdoc`` and ``help()`` do).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`([^`]+)`")


def _lookup(scope: griffe.Object | griffe.Alias | None, dotted: str) -> Any:
    """``dotted`` resolved from ``scope`` outwards (object, its class, module, packages)."""
    while scope is not None:
        try:
            return scope[dotted]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            scope = scope.parent
    return None


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The path of what ``target`` names, seen from ``obj``'s docstring; None if nothing."""
    if target.startswith("."):
        module = obj if obj.is_module else obj.module
        package = module if module.is_package or module.is_init_module else module.parent
        found = _lookup(package, target.lstrip("."))
    else:
        root, _, rest = target.partition(".")
        top = obj.package
        if root == top.name:
            found = top if not rest else _lookup(top, rest)
        else:
            found = _lookup(obj, target)
    if found is None:
        return None
    try:
        return found.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        content = match.group(1).strip()
        titled = re.fullmatch(r"(.+?)\s*<([^>]+)>", content)
        if titled:
            title, target = titled.group(1), titled.group(2)
        else:
            target = content.lstrip("~")
            title = target.rpartition(".")[2] if content.startswith("~") else target
        code = f"<code>{html.escape(title)}</code>"
        path = _resolve(obj, target.lstrip("~"))
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return _ROLE.sub(replace, text)


def _inherit(cls: griffe.Class) -> None:
    """Give undocumented overrides the docstring of the member they override."""
    try:
        bases = cls.mro()
    except (ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return
    for name, member in cls.members.items():
        if member.is_alias or member.docstring is not None or name.startswith("_"):
            continue
        for base in bases:
            inherited = base.members.get(name)
            if inherited is not None and not inherited.is_alias and inherited.docstring:
                member.docstring = griffe.Docstring(
                    inherited.docstring.value, parent=member, lineno=None, endlineno=None
                )
                break


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SiteDocstrings(griffe.Extension):
    """Rewrites Sphinx roles and inherits docstrings once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        objects = list(_walk(pkg))
        for obj in objects:
            if obj.is_class:
                _inherit(obj)
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
