"""Model families -> canonical targets.

Each adapter recognises one family of models (without importing its library until the
model in hand belongs to it), names the maskable weights canonically and says where each
real tensor lives, where the transformer blocks are (``blocks``, ``block_output``), how the
family re-initialises its weights (``reinitialize``) and what it wraps (``inner``); code
outside this package asks the adapter rather than knowing families. ``resolve(model)`` picks
the first adapter that claims the model; the plain ``nn.Module`` adapter claims everything else.
"""

from __future__ import annotations

import abc
import difflib
import fnmatch
from collections.abc import Iterable, Mapping

from torch import nn

# fsdp_mesh / is_dtensor / reshard (in _distributed) and model_class (in _types) are
# re-exported: the adapters and their callers use them from here
from .._distributed import fsdp_mesh, is_dtensor, reshard
from .._types import LinearSite, NotFoundError, Target, model_class


class Adapter(abc.ABC):
    """Base class of a model-family adapter."""

    family: str = "?"

    @abc.abstractmethod
    def matches(self, model: object) -> bool:
        """Whether ``model`` belongs to this family (must not import the family's library)."""

    def root(self, model: object) -> nn.Module:
        """The ``nn.Module`` whose sub-module paths the targets use."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected a torch.nn.Module (or a TransformerLens / nnsight / Hugging Face "
                f"model), got {type(model).__module__}.{type(model).__qualname__}."
            )
        return model

    @abc.abstractmethod
    def all_targets(self, model: object) -> dict[str, Target]:
        """Every maskable weight, default or not, in a stable order."""

    def check_attachable(self, model: object) -> None:
        """Raise a clear error if masks cannot be attached to ``model`` in its current state."""
        return None

    def on_attach(self, model: object) -> None:
        """Called after masks were attached (e.g. to block operations that would break them)."""
        return None

    def on_detach(self, model: object) -> None:
        """Called after masks were removed; undoes :meth:`on_attach`."""
        return None

    def linear_site(self, root: nn.Module, location: tuple[str, str]) -> LinearSite | None:
        """Where the model computes the linear map of the weight at ``location`` (module path
        under ``root``, attribute): what mean, resample and patch ablation need for a weight
        that is not an ``nn.Linear`` / ``Conv1D`` layer's ``weight`` (those are handled without
        asking). ``None`` (the default): the weight has no such map these ablations can use;
        an adapter raises ``TypeError`` itself to say why a known weight cannot have one."""
        return None

    def inner(self, model: object) -> nn.Module:
        """The model this family wraps (an nnsight wrapper's module, a ``TransformerBridge``'s
        transformers model); for a family that wraps nothing, :meth:`root`."""
        return self.root(model)

    def copyable(self, model: object) -> bool:
        """Whether a deep copy of ``model`` works as the model does, so that a method which
        trains weights can train the copy and leave ``model`` alone (the default). Where it
        does not, ``si.find`` trains :meth:`root` itself and then puts its weights back."""
        return True

    def blocks(self, model: object) -> list[nn.Module]:
        """The model's transformer blocks in order: the modules its forward pass runs, under
        :meth:`root`."""
        root = self.root(model)
        raise TypeError(
            f"The {self.family!r} adapter does not know where the blocks of a "
            f"{model_class(root).__qualname__} are; expected an adapter that implements "
            "`blocks(model)`. Implement it in the adapter, or pass a module path where a "
            "function accepts one."
        )

    def block_output(self, model: object, block: nn.Module) -> nn.Module:
        """The module whose forward output is the residual stream after ``block`` (one of
        :meth:`blocks`): the block itself, unless the family has a hook point there."""
        return block

    def reinitialize(self, root: nn.Module) -> None:
        """Re-initialise ``root``'s weights in place the family's own way, drawing from the
        global RNG: here its ``init_weights()``, else every sub-module's
        ``reset_parameters()``."""
        if callable(getattr(root, "init_weights", None)):
            root.init_weights()
            return
        resettable = [m for m in root.modules() if callable(getattr(m, "reset_parameters", None))]
        if not resettable:
            raise TypeError(
                f"Cannot re-initialise a {type(root).__qualname__}: it is not a transformers "
                "model, has no init_weights() and no sub-module with reset_parameters(). Build "
                "a fresh model from its config instead."
            )
        for module in resettable:
            module.reset_parameters()


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is transformers' GPT-2-style ``Conv1D`` (weight stored ``[in, out]``),
    also when parametrized or FSDP-wrapped; checked without importing transformers."""
    cls = model_class(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def real_tensor(module: nn.Module, attribute: str):
    """The unmasked tensor ``module.<attribute>``, also while it is parametrized; ``None`` if
    the module has no such parameter. On an FSDP-sharded model this is the local shard's
    DTensor (``DTensor.full_tensor()`` gathers it)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and attribute in parametrizations:
        return parametrizations[attribute].original
    return (
        module._parameters.get(attribute)
        if attribute in module._parameters
        else getattr(module, attribute, None)
    )


_ADAPTERS: list[Adapter] = []

OPTIONAL_KINDS = frozenset({"bias", "norm"})
"""Kinds of target selected only on request (``si.targets(..., biases=True)``): biases and
norm weights. They are not weight matrices, are left out of the fingerprint, and not every
family names them (plain modules, every Hugging Face family and the TransformerLens bridges and
HookedTransformers of those families do)."""


def register_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Add an adapter; adapters registered first are tried first (the plain one is last)."""
    if any(a.family == adapter.family for a in _ADAPTERS):
        raise ValueError(
            f"An adapter for family {adapter.family!r} is already registered "
            f"(registered: {[a.family for a in _ADAPTERS]})."
        )
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)
    return adapter


def resolve(model: object) -> Adapter:
    """The adapter for ``model``'s family; for a ``torch.compile``-d model, that of the model
    underneath, called on it (see :mod:`.compiled`)."""
    from .compiled import CompiledAdapter, is_compiled, uncompiled

    if is_compiled(model):
        return CompiledAdapter(resolve(uncompiled(model)))
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"subnet_interp cannot mask a {type(model).__module__}.{type(model).__qualname__}: "
        f"expected a torch.nn.Module or a wrapper of one (adapters: "
        f"{[a.family for a in _ADAPTERS]})."
    )


def _as_patterns(value: str | Iterable[str] | None, arg: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    patterns = list(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"`{arg}` must hold glob strings, got {pattern!r}.")
    return patterns


def _abbreviated(names: list[str], limit: int = 40) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names) - limit} more)"


def select(
    available: Mapping[str, Target],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    family: str = "?",
    biases: bool = False,
) -> dict[str, Target]:
    """Select targets by glob patterns over canonical names.

    With no ``include`` the default targets are taken (weight matrices; no embeddings,
    unembeddings, biases or norms). Each ``include`` pattern must match something, and so must
    each ``exclude`` pattern; otherwise the error lists the available names. Bias and norm
    targets (kinds in ``OPTIONAL_KINDS``) exist for patterns only with ``biases=True``, which
    also adds all of them to the default selection.
    """
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude") or []
    if not biases:
        hidden = {n: t for n, t in available.items() if t.kind in OPTIONAL_KINDS}
        available = {n: t for n, t in available.items() if n not in hidden}
        for pattern in include_patterns or []:
            named = [n for n in hidden if fnmatch.fnmatchcase(n, pattern)]
            if named and not any(fnmatch.fnmatchcase(n, pattern) for n in available):
                raise NotFoundError(
                    f"`include` pattern {pattern!r} matches only bias / norm targets "
                    f"({_abbreviated(named, 6)}), which are selected on request: pass "
                    "`biases=True` to si.targets (and the mapping it returns to si.find's "
                    "`targets=`)."
                )
    names = list(available)
    if include_patterns is None:
        chosen = [n for n in names if available[n].default or available[n].kind in OPTIONAL_KINDS]
    else:
        chosen = []
        for pattern in include_patterns:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                _raise_no_match(pattern, "include", available, family)
            chosen.extend(h for h in hits if h not in chosen)
        chosen.sort(key=names.index)
    for pattern in exclude_patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            _raise_no_match(pattern, "exclude", available, family)
        chosen = [n for n in chosen if not fnmatch.fnmatchcase(n, pattern)]
    return {n: available[n] for n in chosen}


def real_name_hint(name: str, available: Mapping[str, Target]) -> str:
    """A hint for a name (or glob) that matches the real parameters behind canonical targets
    rather than the canonical names; ``""`` if it does not."""
    holders: dict[str, list[str]] = {}
    for target in available.values():
        real = f"{target.module}.{target.attribute}" if target.module else target.attribute
        if fnmatch.fnmatchcase(real, name) or fnmatch.fnmatchcase(target.module, name):
            holders.setdefault(real, []).append(target.name)
    if not holders or all(real in holders[real] for real in holders):
        return ""
    shown = "; ".join(f"{real} holds {names}" for real, names in list(holders.items())[:4])
    more = f"; ... ({len(holders) - 4} more)" if len(holders) > 4 else ""
    return (
        f" {name!r} names the model's real parameter(s), not canonical targets ({shown}{more}); "
        "use the canonical names."
    )


def _raise_no_match(pattern: str, arg: str, available: Mapping[str, Target], family: str) -> None:
    names = list(available)
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    hint = real_name_hint(pattern, available) or (f" Closest: {close}." if close else "")
    canonical_hint = ""
    if family == "torch" and ("blocks." in pattern or "W_" in pattern):
        canonical_hint = (
            " Canonical transformer names (blocks.L.attn.W_Q, ...) exist only for model "
            "families subnet_interp knows (TransformerLens, nnsight, and the Hugging Face "
            "families in the README's model table); this model is a plain nn.Module, so its "
            "targets are its parameter names (a torch nn.MultiheadAttention at path P: P.W_Q "
            "... P.W_O)."
        )
    raise NotFoundError(
        f"`{arg}` pattern {pattern!r} matches no maskable weight of this {family} model.{hint}"
        f"{canonical_hint} Available: {_abbreviated(names)}."
    )


def _register_builtin() -> None:
    from .hf import HuggingFaceAdapter
    from .nnsight import NNsightAdapter
    from .plain import PlainAdapter
    from .transformer_lens import HookedTransformerAdapter, TransformerBridgeAdapter

    register_adapter(PlainAdapter(), first=False)
    register_adapter(HuggingFaceAdapter())
    register_adapter(HookedTransformerAdapter())
    register_adapter(TransformerBridgeAdapter())
    register_adapter(NNsightAdapter())


_register_builtin()

__all__ = [
    "Adapter",
    "LinearSite",
    "OPTIONAL_KINDS",
    "fsdp_mesh",
    "is_dtensor",
    "model_class",
    "reshard",
    "real_name_hint",
    "real_tensor",
    "register_adapter",
    "resolve",
    "select",
]
