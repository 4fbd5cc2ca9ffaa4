"""The registry of subnetwork-finding methods (``si.methods``).

``si.methods.names()`` lists them, ``si.methods.get(name)`` returns a method's configuration
class (a frozen dataclass whose defaults are its paper's), ``si.methods.create(name, **hp)``
builds one, and ``@si.methods.register`` adds a new one. One file per method in this folder.
"""

from __future__ import annotations

from .._registry import methods as registry
from ._base import FindContext, FindResult, MaskMethod, Method, TrainState

register = registry.register
unregister = registry.unregister
names = registry.names
get = registry.get
create = registry.create

# Importing a method's module registers it.
from . import (  # noqa: E402
    continuous_sparsification,
    continuous_sparsification_lepori,
    gumbel_sigmoid,
    hard_concrete,
    lottery_ticket,
    lt_sft,
    magnitude,
    random,
)
from .random import random_like  # noqa: E402

__all__ = [
    "FindContext",
    "FindResult",
    "MaskMethod",
    "Method",
    "TrainState",
    "continuous_sparsification",
    "continuous_sparsification_lepori",
    "create",
    "get",
    "gumbel_sigmoid",
    "hard_concrete",
    "lottery_ticket",
    "lt_sft",
    "magnitude",
    "random",
    "random_like",
    "names",
    "register",
    "registry",
    "unregister",
]
