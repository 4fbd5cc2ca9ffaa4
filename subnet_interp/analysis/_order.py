"""``(model, subnetwork, ...)``: the argument order of every analysis function that takes both,
and the deprecation path for the orders used before.

Before, ``components`` and ``plots`` took ``(subnetwork, model, ...)`` and ``modules`` /
``head_ov`` took the subnetwork as a trailing argument (``modules(model, n_clusters, *,
subnetwork=None)``, ``head_ov(model, layer, head, subnetwork=None)``). The decorator
:func:`model_then_subnetwork` puts such a call into the new order and emits a ``FutureWarning``
naming it; calls in the new order pass through untouched.
"""

from __future__ import annotations

import functools
import typing
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .._subnetwork import Subnetwork

F = TypeVar("F", bound=Callable[..., Any])


def _is_subnetwork(value: Any) -> bool:
    return isinstance(value, Subnetwork)


def _swapped(args: list, kwargs: dict) -> list | None:
    """The arguments of a ``(subnetwork, model, ...)`` call in the new order, or ``None`` if the
    call is already ``(model, subnetwork, ...)``."""
    if not args:
        return None
    first, rest = args[0], args[1:]
    if _is_subnetwork(first):
        if rest and _is_subnetwork(rest[0]):
            return None  # two subnetworks: not an order this helper can repair
        model = rest[0] if rest else kwargs.pop("model", None)
        return [model, first, *rest[1:]]
    if first is None:  # ``edge_scores(None, model)``: the whole model, old order
        if rest and rest[0] is not None and not _is_subnetwork(rest[0]):
            return [rest[0], None, *rest[1:]]
        if not rest and kwargs.get("model") is not None:
            return [kwargs.pop("model"), None]
    return None


def _moved(args: list, kwargs: dict, trailing: int) -> list | None:
    """The arguments of a ``(model, *params, subnetwork=...)`` call (``trailing`` = how many
    positional parameters stood before the subnetwork) in the new order, or ``None``."""
    if "subnetwork" in kwargs and len(args) < 2:
        return None  # keywords only: valid in both orders
    if len(args) >= 2 and (args[1] is None or _is_subnetwork(args[1])):
        return None  # already (model, subnetwork, ...)
    if not args:
        return None
    params = args[1 : 1 + trailing]
    later = args[1 + trailing :]
    subnetwork = later.pop(0) if later else kwargs.pop("subnetwork", None)
    return [args[0], subnetwork, *params, *later]


def model_then_subnetwork(trailing: int | None = None) -> Callable[[F], F]:
    """Decorator for an analysis function ``f(model, subnetwork, ...)`` that also accepts the
    order it had before, with a ``FutureWarning`` naming the new one.

    Args:
        trailing: ``None`` if the old order was ``f(subnetwork, model, ...)`` (a
            :class:`Subnetwork` first, or ``None`` first and then the model). Otherwise the old
            order was ``f(model, *params, subnetwork=None)`` with ``trailing`` positional
            parameters before the subnetwork (given by keyword or as the next positional
            argument); an old call is one whose second argument is neither a ``Subnetwork`` nor
            ``None``, or that omits the subnetwork.
    """

    def decorate(function: F) -> F:
        name = function.__name__
        if trailing is None:
            old = f"{name}(subnetwork, model, ...)"
        else:
            old = f"{name}(model, ..., subnetwork=...)"
        message = (
            f"{old} is deprecated; call {name}(model, subnetwork, ...): every analysis function "
            "takes the model first, then the subnetwork"
            + ("" if trailing is None else " (None for the whole model)")
            + "."
        )

        @typing.no_type_check  # the wrapped function is type-checked once reordered
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            listed = list(args)
            if trailing is None:
                reordered = _swapped(listed, kwargs)
            elif len(listed) == 1 and "subnetwork" not in kwargs:
                reordered = [listed[0], None]  # the subnetwork was optional before
            else:
                reordered = _moved(listed, kwargs, trailing)
            if reordered is not None:
                warnings.warn(message, FutureWarning, stacklevel=2)
                listed = reordered
            return function(*listed, **kwargs)

        return typing.cast(F, wrapper)

    return decorate


__all__ = ["model_then_subnetwork"]
