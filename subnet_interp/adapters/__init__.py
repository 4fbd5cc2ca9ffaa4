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
import sys
from collections.abc import Iterable, Mapping

from torch import nn

from .._types import NotFoundError, Target


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

    def inner(self, model: object) -> nn.Module:
        """The model this family wraps (an nnsight wrapper's module, a ``TransformerBridge``'s
        transformers model); for a family that wraps nothing, :meth:`root`."""
        return self.root(model)

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


_WRAPPER_MODULES = ("torch.distributed.fsdp", "torch.nn.utils.parametrize")


def model_class(obj: object) -> type:
    """The class of ``obj`` as its library defined it: FSDP2's ``fully_shard`` and
    ``torch.nn.utils.parametrize`` swap a module's class for a generated subclass
    (``FSDPGPT2LMHeadModel``, ``ParametrizedLinear``); adapters recognise families by the
    class underneath."""
    for cls in type(obj).__mro__:
        if not cls.__module__.startswith(_WRAPPER_MODULES):
            return cls
    return type(obj)


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is transformers' GPT-2-style ``Conv1D`` (weight stored ``[in, out]``),
    also when parametrized or FSDP-wrapped; checked without importing transformers."""
    cls = model_class(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (checked without importing
    torch.distributed where it is unavailable)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def fsdp_mesh(model: object, root: nn.Module):
    """The device mesh of a model sharded with FSDP2's ``fully_shard``; ``None`` if no parameter
    of ``root`` is a DTensor.

    Every FSDP module is resharded first (``FSDPModule.reshard``), so the parameters are the
    sharded DTensors FSDP manages (after a forward without backward, FSDP keeps the root's
    parameters gathered). Only FSDP2's layout is accepted: every DTensor parameter on one 1-D
    mesh, sharded on dim 0. Tensor parallelism, HSDP and mixture-of-experts models get a clear
    error.
    """
    name_of_model = model_class(model).__qualname__
    fsdp_modules = reshard(root)
    sharded = [(name, p) for name, p in root.named_parameters() if is_dtensor(p)]
    if not sharded:
        return None
    from torch.distributed.tensor import Shard

    name, first = sharded[0]
    mesh = first.device_mesh
    for name, param in sharded:
        if param.device_mesh != mesh or mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"{name_of_model}'s parameter {name!r} is a DTensor on {param.device_mesh} with "
                f"placements {param.placements}. subnet_interp supports models sharded by "
                "FSDP2's fully_shard on one 1-D mesh (every parameter Shard(0)); tensor "
                "parallelism and HSDP (2-D meshes) are not supported. Shard the model with "
                "`fully_shard(block, mesh=init_device_mesh(device, (world_size,)))`."
            )
    import torch.distributed as dist

    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{name_of_model} is sharded over {mesh.size()} of the {dist.get_world_size()} "
            "processes of the default group; subnet_interp averages mask gradients over the "
            "whole group, so shard over all of them (one mesh of world_size devices), or run "
            "one process group per model."
        )
    experts = _expert_counts(getattr(root, "config", None))
    if experts:
        raise ValueError(
            f"{name_of_model} is a mixture-of-experts model ({experts}) sharded with FSDP2. "
            "subnet_interp gathers a sharded mask while its module runs, and experts run on "
            "some ranks and not others, so the ranks' collectives would not match. Run it "
            "unsharded (data-parallel under torchrun)."
        )
    if not fsdp_modules:
        raise ValueError(
            f"{name_of_model}'s parameter {name!r} is a sharded DTensor, but no module of the "
            "model is an FSDP module: the weights are never gathered for the forward pass. "
            "Shard the model with FSDP2's fully_shard (or pass the unsharded model)."
        )
    return mesh


def reshard(root: nn.Module) -> list[nn.Module]:
    """Reshard every FSDP2 module under ``root`` (FSDP keeps the root's parameters gathered
    after a forward without backward), so its parameters are the sharded ones; returns them."""
    if "torch.distributed.fsdp" not in sys.modules:  # never imported: nothing is FSDP-sharded
        return []
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.reshard()
    return modules


_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _expert_counts(config: object, depth: int = 0) -> dict[str, int]:
    """Expert counts above 1 in a transformers config or its sub-configs (``text_config`` of
    multimodal models, ``ffn_config`` of DBRX, ...)."""
    if config is None or depth > 2:
        return {}
    found = {
        key: value
        for key in _EXPERT_KEYS
        if isinstance(value := getattr(config, key, None), int) and value > 1
    }
    for key, value in vars(config).items() if hasattr(config, "__dict__") else ():
        if hasattr(value, "to_dict") and hasattr(value, "__dict__"):  # a nested config
            found.update({f"{key}.{k}": v for k, v in _expert_counts(value, depth + 1).items()})
    return found


def real_tensor(module: nn.Module, attribute: str):
    """The unmasked tensor ``module.<attribute>``, also while it is parametrized; ``None`` if
    the module has no such parameter. On an FSDP-sharded model this is the local shard's
    DTensor (see :func:`full_tensor`)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and attribute in parametrizations:
        return parametrizations[attribute].original
    return (
        module._parameters.get(attribute)
        if attribute in module._parameters
        else getattr(module, attribute, None)
    )


_ADAPTERS: list[Adapter] = []


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
    """The adapter for ``model``'s family."""
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
) -> dict[str, Target]:
    """Select targets by glob patterns over canonical names.

    With no ``include`` the default targets are taken (weight matrices; no embeddings,
    unembeddings, biases or norms). Each ``include`` pattern must match something, and so must
    each ``exclude`` pattern; otherwise the error lists the available names.
    """
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude") or []
    names = list(available)
    if include_patterns is None:
        chosen = [n for n in names if available[n].default]
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
            "families subnet_interp knows (TransformerLens, nnsight, Hugging Face GPT-2 / "
            "GPT-NeoX / Llama); this model is a plain nn.Module, so its targets are its "
            "parameter names."
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
