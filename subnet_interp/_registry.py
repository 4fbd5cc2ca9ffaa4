"""A named registry of subnetwork-finding methods (frozen dataclasses of hyper-parameters)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from collections.abc import Callable, Mapping
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
        """The registered names, sorted."""
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
        method = cls(**hparams)
        check_hparams(method, kind=self._kind)
        return method

    def resolve(
        self,
        spec: Any,
        hparams: Mapping[str, Any] | None = None,
        *,
        base: type,
        defaults: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None = None,
        requires: type | None = None,
        requires_why: str = "",
    ) -> Any:
        """The instance ``spec`` stands for: a registered name (created with ``hparams`` over
        the caller's ``defaults(name, hparams)``, then the paper defaults) or an instance of
        ``base`` (returned as it is; ``hparams`` are then refused, they would be ignored).

        ``requires``: a subclass the result must be an instance of; otherwise a ValueError
        starting with ``requires_why`` lists the registered names that qualify.
        """
        hparams = dict(hparams or {})
        if isinstance(spec, base):
            if hparams:
                raise ValueError(
                    "Hyper-parameters were given as keywords and a "
                    f"{self._kind} instance as `{self._kind}`; set them on the instance instead "
                    f"({sorted(hparams)})."
                )
            resolved = spec
        elif isinstance(spec, str):
            self.get(spec)  # an unknown name fails here, listing the registered ones
            chosen = dict(defaults(spec, hparams)) if defaults is not None else {}
            resolved = self.create(spec, **{**chosen, **hparams})
        else:
            raise TypeError(
                f"`{self._kind}` must be a registered {self._kind} name or a {self._kind} "
                f"instance, got {type(spec).__name__}: {spec!r}. Registered: {self.names()}."
            )
        if requires is not None and not isinstance(resolved, requires):
            eligible = [name for name in self.names() if issubclass(self.get(name), requires)]
            raise ValueError(f"{requires_why} ({eligible}); got {resolved.name!r}.")
        return resolved

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._kind}s={self.names()})"


# Hyper-parameters that mean the same in every method, by conventional name: the range a value
# must lie in for the method to make sense. Checked by `create` and `si.find`, so a bad value
# fails before training instead of silently (lr = 0) or deep inside torch (lr < 0).
_RANGES: dict[str, tuple[str, typing.Callable[[float], bool]]] = {
    "lr": ("> 0", lambda v: v > 0),
    "weight_lr": ("> 0", lambda v: v > 0),
    "lagrangian_lr": ("> 0", lambda v: v > 0),
    "temperature": ("> 0", lambda v: v > 0),
    "final_temperature": ("> 0", lambda v: v > 0),
    "beta": ("> 0", lambda v: v > 0),
    "clip_grad_norm": ("> 0", lambda v: v > 0),
    "alpha": (">= 0", lambda v: v >= 0),
    "l0_lambda": (">= 0", lambda v: v >= 0),
    "l1_lambda": (">= 0", lambda v: v >= 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "target_density": ("in (0, 1]", lambda v: 0 < v <= 1),
    "mask_samples": (">= 1", lambda v: v >= 1),
    "num_rounds": (">= 1", lambda v: v >= 1),
    "rounds": (">= 1", lambda v: v >= 1),
    "dataset_size": (">= 1", lambda v: v >= 1),
}


def _numeric_kind(hint: Any) -> type | None:
    """The numeric type a field annotation allows (``float`` admits ints); None if not numeric."""
    options = typing.get_args(hint) or (hint,)
    if float in options:
        return numbers.Real
    if int in options:
        return numbers.Integral
    return None


def check_hparams(method: Any, *, kind: str = "method", types_only: bool = False) -> None:
    """Raise if a numeric hyper-parameter of ``method`` has the wrong type or a meaningless value.

    Types come from the dataclass annotations; ranges from the conventional names in
    ``_RANGES`` (learning rates and temperatures positive, penalties non-negative, target
    densities in (0, 1], counts at least 1). ``None`` passes where the field allows it.
    ``types_only`` checks the types alone: a method's ``__post_init__`` calls it first, so its
    own range checks (with their own messages) never compare a string.
    """
    cls = type(method)
    if not dataclasses.is_dataclass(cls):
        return
    name = getattr(cls, "name", cls.__name__)
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a plugin's annotations we cannot resolve: check ranges only
        hints = {}
    for field in dataclasses.fields(cls):
        value = getattr(method, field.name)
        if value is None:
            continue
        default = "" if field.default is dataclasses.MISSING else f" (default {field.default!r})"
        numeric = _numeric_kind(hints.get(field.name))
        if numeric is not None and (isinstance(value, bool) or not isinstance(value, numeric)):
            expected = "a number" if numeric is numbers.Real else "an int"
            raise TypeError(
                f"{kind} {name!r}: hyper-parameter `{field.name}` must be {expected}, got "
                f"{type(value).__name__} {value!r}. Pass {expected}{default}."
            )
        if types_only:
            continue
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise ValueError(
                f"{kind} {name!r}: hyper-parameter `{field.name}` must be finite, got {value!r}."
                f" Pass a finite value{default}."
            )
        if field.name in _RANGES and isinstance(value, numbers.Real):
            wanted, ok = _RANGES[field.name]
            if not ok(value):
                raise ValueError(
                    f"{kind} {name!r}: hyper-parameter `{field.name}` must be {wanted}, got "
                    f"{value!r}. Pass a value {wanted}{default}."
                )


methods = Registry("method")

__all__ = ["Registry", "check_hparams", "methods"]
