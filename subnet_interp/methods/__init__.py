"""The registry of subnetwork-finding methods (``si.methods``).

``si.methods.names()`` lists them, ``si.methods.get(name)`` returns a method's configuration
class (a frozen dataclass whose defaults are its paper's), ``si.methods.create(name, **hp)``
builds one, and ``@si.methods.register`` adds a new one. One file per method in this folder.
"""

from __future__ import annotations

import importlib
import pkgutil

from .._registry import methods as registry
from ._base import FindContext, FindResult, MaskMethod, Method, TrainState

register = registry.register
unregister = registry.unregister
names = registry.names
get = registry.get
create = registry.create


def _import_every_method() -> None:
    """Import (and so register) every public module of this folder: a new method is one new
    file, with no list here to forget to extend."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_every_method()

from .random import random_like  # noqa: E402

__all__ = [
    "FindContext",
    "FindResult",
    "MaskMethod",
    "Method",
    "TrainState",
    "create",
    "get",
    "random_like",
    "names",
    "register",
    "registry",
    "unregister",
]
