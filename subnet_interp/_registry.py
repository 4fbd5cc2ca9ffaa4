"""A named registry of subnetwork-finding methods (frozen dataclasses of hyper-parameters)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from ._types import NotFoundError

T = TypeVar("T", bound=type)


class Registry:
    """Maps a method name to its configuration class.

    A method class is a frozen dataclass with a class attribute ``name``; its field defaults
    are the original paper's hyper-parameters. Registering a taken name and asking for an
    unknown one both raise and list what is registered.
    """

    def __init__(self, kind: str = "method"):
        self._kind = kind
        self._entries: dict[str, type] = {}

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name``."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{cls!r} needs a class attribute `name` (a non-empty str) to be registered as "
                f"a {self._kind}."
            )
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(
                f"{self._kind} {name!r}: {cls.__name__} must be a frozen dataclass "
                "(`@dataclass(frozen=True)`) so its hyper-parameters cannot change after creation."
            )
        if name in self._entries:
            raise ValueError(
                f"A {self._kind} named {name!r} is already registered "
                f"({self._entries[name].__module__}.{self._entries[name].__qualname__}). "
                f"Registered: {self.names()}. Pick another name."
            )
        self._entries[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugins that replace a method)."""
        self.get(name)
        del self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type:
        """The configuration class registered as ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"{self._kind} names are str, got {type(name).__name__}: {name!r}.")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise NotFoundError(
                f"Unknown {self._kind} {name!r}. Registered: {self.names()}.{hint}"
            ) from None

    def create(self, name: str, **hparams: Any) -> Any:
        """An instance of method ``name`` with ``hparams`` overriding the paper defaults."""
        cls = self.get(name)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(hparams) - fields)
        if unknown:
            raise TypeError(
                f"{self._kind} {name!r} has no hyper-parameter(s) {unknown}; it takes "
                f"{sorted(fields)}."
            )
        return cls(**hparams)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._kind}s={self.names()})"


methods = Registry("method")

__all__ = ["Registry", "methods"]
