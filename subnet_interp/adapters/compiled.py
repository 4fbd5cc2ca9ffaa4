"""Models wrapped by ``torch.compile``: the adapter of the model underneath, reached through it.

``torch.compile(model)`` returns an ``OptimizedModule`` whose parameters are the model's own,
registered under ``_orig_mod.``. Masks attach to the model underneath (its parameters are
the compiled module's), so the targets, their names and the fingerprint are those of the
uncompiled model, and a subnetwork found on one applies to the other. The compiled forward
reads the masked weights through the parametrization like the eager one (Dynamo traces
property reads), so it computes with the mask.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._types import LinearSite, Target
from . import Adapter


def is_compiled(model: object) -> bool:
    """Whether ``model`` is what ``torch.compile(module)`` returned (checked without importing
    ``torch._dynamo``)."""
    cls = type(model)
    return (
        cls.__name__ == "OptimizedModule"
        and cls.__module__.startswith("torch._dynamo")
        and isinstance(getattr(model, "_orig_mod", None), nn.Module)
    )


def uncompiled(model: Any) -> Any:
    """The module ``torch.compile`` wrapped (through nested wrappers); ``model`` otherwise."""
    while is_compiled(model):
        model = model._orig_mod
    return model


def compiled_anywhere(model: object, root: nn.Module) -> bool:
    """Whether ``model`` is compiled, or any module under its ``root`` was compiled in place
    (``module.compile()``)."""
    return is_compiled(model) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in root.modules()
    )


class CompiledAdapter(Adapter):
    """The adapter of a compiled model's original module, every call made on that module."""

    def __init__(self, wrapped: Adapter):
        self.wrapped = wrapped
        self.family = wrapped.family

    def matches(self, model: object) -> bool:
        return is_compiled(model) and self.wrapped.matches(uncompiled(model))

    def root(self, model: object) -> nn.Module:
        return self.wrapped.root(uncompiled(model))

    def all_targets(self, model: object) -> dict[str, Target]:
        return self.wrapped.all_targets(uncompiled(model))

    def check_attachable(self, model: object) -> None:
        self.wrapped.check_attachable(uncompiled(model))

    def on_attach(self, model: object) -> None:
        self.wrapped.on_attach(uncompiled(model))

    def on_detach(self, model: object) -> None:
        self.wrapped.on_detach(uncompiled(model))

    def linear_site(self, root: nn.Module, location: tuple[str, str]) -> LinearSite | None:
        return self.wrapped.linear_site(root, location)

    def inner(self, model: object) -> nn.Module:
        return self.wrapped.inner(uncompiled(model))

    def blocks(self, model: object) -> list[nn.Module]:
        return self.wrapped.blocks(uncompiled(model))

    def block_output(self, model: object, block: nn.Module) -> nn.Module:
        return self.wrapped.block_output(uncompiled(model), block)

    def reinitialize(self, root: nn.Module) -> None:
        self.wrapped.reinitialize(root)

    def __getattr__(self, name: str) -> Any:
        # a family's own methods (beyond the Adapter interface), called on the original module
        wrapped = self.__dict__.get("wrapped")
        if wrapped is None:
            raise AttributeError(name)
        attribute = getattr(wrapped, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return attribute(*(uncompiled(a) for a in args), **kwargs)

        return call


__all__ = ["CompiledAdapter", "compiled_anywhere", "is_compiled", "uncompiled"]
