"""Where the input-based ablations (mean, resample, patching) read a masked weight's input and
add its masked-out term: one :class:`~subnet_interp._types.LinearSite` per weight.

For an owner ``y = W x (+ b)`` those ablations compute ``y = (m*W) x + ((1-m)*W) x' + b``: the
parametrization gives ``m*W``, and the hooks registered here add ``((1-m)*W) x'`` to ``y``. For
an ``nn.Linear`` or transformers ``Conv1D`` weight the site is the layer itself (its input, its
output, the layer's contraction); for any other owner the model's adapter describes the map
(``Adapter.linear_site``: a legacy ``HookedTransformer``'s ``W_Q`` reads the attention's
``query_input`` and writes ``hook_q``). ``_ablations.py`` reaches the model only through here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import adapters
from ._types import LinearSite, Target

LINEAR = "...i,oi->...o"  # nn.Linear stores [out, in]
CONV1D = "...i,io->...o"  # transformers' Conv1D stores [in, out]


def module_kind(module: nn.Module) -> str:
    """``"linear"`` (``nn.Linear``), ``"conv1d"`` (transformers' ``Conv1D``) or ``"other"``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if adapters.is_conv1d(module):
        return "conv1d"
    return "other"


def label(location: tuple[str, str]) -> str:
    """How messages name a masked weight: a layer's path for its ``weight``, else the path
    and the attribute (``blocks.0.attn.W_Q``)."""
    return location[0] if location[1] == "weight" else f"{location[0]}.{location[1]}"


def resample_index(pool: Tensor, x: Tensor, generator: torch.Generator, where: str) -> Tensor:
    """Which example of ``pool`` (the reference inputs) each example of ``x`` gets, drawn with
    ``generator`` (int64, on its device); a clear error when their per-example shapes differ.
    ``where`` names the site in the message."""
    if pool.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"ResampleAblation at {where}: reference inputs have shape "
            f"{tuple(pool.shape[1:])} per example but the model now gets "
            f"{tuple(x.shape[1:])}; use reference data of the same shape (e.g. the same "
            "sequence length)."
        )
    return torch.randint(pool.shape[0], (x.shape[0],), generator=generator)


def linear_sites(
    ablation: object, model: object, root: nn.Module, targets: Mapping[str, Target]
) -> dict[tuple[str, str], LinearSite]:
    """The site of every targeted weight; a clear ``TypeError`` for a weight with none.

    The adapter of ``model`` (of ``root`` when there is no model) is asked first; where it
    knows no site, ``nn.Linear`` / ``Conv1D`` weights are their own layer's map.
    """
    adapter = adapters.resolve(model if model is not None else root)
    found: dict[tuple[str, str], LinearSite] = {}
    for location in dict.fromkeys(t.location for t in targets.values()):
        module_path, attribute = location
        module = root.get_submodule(module_path)
        kind = module_kind(module)
        # the adapter first: it may know a layer whose forward the model never calls
        site = adapter.linear_site(root, location)
        if site is None and attribute == "weight" and kind != "other":
            equation = LINEAR if kind == "linear" else CONV1D
            found[location] = LinearSite(module_path, "input", module_path, equation)
            continue
        if site is None:
            names = sorted(t.name for t in targets.values() if t.location == location)
            raise TypeError(
                f"{type(ablation).__name__} needs each target to be the weight of an nn.Linear or "
                "transformers Conv1D layer, or a weight whose model adapter describes its linear "
                "map (`Adapter.linear_site`; e.g. a TransformerLens HookedTransformer's W_Q, W_K, "
                "W_V, W_O, mlp.W_in, mlp.W_out, mlp.W_gate and unembed.W_U; transformers 5's "
                "mixture-of-experts routers and fused experts have their own, _moe_sites.py), "
                f"because its inputs are recorded there; {module_path!r}.{attribute} (target {', '.join(names)}) "
                f"belongs to a {type(module).__name__} and the {adapter.family!r} adapter gives "
                "no linear map for it. Zero ablation and ReinitAblation work on any target: use "
                "one of them for it, or restrict the targets (e.g. `exclude=`)."
            )
        _check_site(root, location, site, adapter.family)
        found[location] = site
    return found


def _check_site(root: nn.Module, location: tuple[str, str], site: object, family: str) -> None:
    if not isinstance(site, LinearSite):
        raise TypeError(
            f"The {family!r} adapter's linear_site({location!r}) returned a "
            f"{type(site).__name__}; expected a LinearSite or None."
        )
    for path in (site.input_module, site.output_module):
        try:
            root.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"The {family!r} adapter's linear site of {label(location)!r} names the module "
                f"{path!r}, which this model does not have; fix the adapter's linear_site."
            ) from None
    if site.input_from != "output":
        _reader(root.get_submodule(site.input_module), site)


def masked_out_term(
    owner: nn.Module, attribute: str, equation: str, mask: Tensor, inputs: Tensor
) -> Tensor:
    """``inputs`` through the masked-out part of ``owner.<attribute>``: ``((1 - m) * W)``
    applied as ``equation`` says, no bias."""
    weight = owner.parametrizations[attribute].original
    removed = weight * (1 - mask)
    if equation == LINEAR:
        return torch.nn.functional.linear(inputs, removed)
    if equation == CONV1D:
        return inputs @ removed
    return torch.einsum(equation, inputs, removed)


def _reader(module: nn.Module, site: LinearSite) -> Callable[[tuple, dict], Tensor]:
    """``(args, kwargs) -> x`` for a site that reads an argument of ``module``'s forward."""
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # no introspectable signature
        parameters = []
    name = site.input_from
    if name == "input":
        first = parameters[0] if parameters else None

        def read_first(args: tuple, kwargs: dict) -> Tensor:
            if args:
                return args[0]
            if first in kwargs:
                return kwargs[first]
            raise RuntimeError(
                f"{site.input_module!r} was called without arguments; the masked-out term "
                "needs its input."
            )

        return read_first
    if name not in parameters:
        raise ValueError(
            f"A linear site reads the argument {name!r} of {site.input_module!r}, but "
            f"{type(module).__name__}.forward takes {parameters}; expected 'input', 'output' or "
            "one of those names."
        )
    index = parameters.index(name)

    def read(args: tuple, kwargs: dict) -> Tensor:
        if name in kwargs:
            return kwargs[name]
        if index < len(args):
            return args[index]
        raise RuntimeError(
            f"{site.input_module!r} was called without its {name!r} argument; the masked-out "
            "term needs it."
        )

    return read


def input_hook(root: nn.Module, site: LinearSite, record: Callable[[Tensor], None]) -> Any:
    """Call ``record(x)`` with the map's input whenever the model reads it; returns the handle."""
    module = root.get_submodule(site.input_module)
    if site.input_from == "output":

        def after(module: nn.Module, args: tuple, output: Tensor) -> None:
            record(output)

        return module.register_forward_hook(after)
    read = _reader(module, site)

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        record(read(args, kwargs))

    return module.register_forward_pre_hook(before, with_kwargs=True)


@contextmanager
def removed_on_error(handles: list) -> Iterator[list]:
    """Yield ``handles``, the list a caller appends hook handles to; if the block raises, remove
    them all (newest first) before the error goes on, so no hook outlives a failed attach."""
    try:
        yield handles
    except BaseException:
        for handle in reversed(handles):
            handle.remove()
        raise


def watch(
    root: nn.Module,
    site: LinearSite,
    fn: Callable[[Tensor | None, Tensor], Tensor],
    *,
    needs_input: bool = True,
) -> list:
    """Replace the map's output ``y`` by ``fn(x, y)`` each time it is computed, with ``x`` the
    input it was computed from (``None`` unless ``needs_input``); returns the hook handles."""
    output_module = root.get_submodule(site.output_module)
    if not needs_input:

        def plain(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            return fn(None, output)

        return [output_module.register_forward_hook(plain)]
    if site.input_module == site.output_module and site.input_from != "output":
        read = _reader(output_module, site)

        def same(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            return fn(read(args, kwargs), output)

        return [output_module.register_forward_hook(same, with_kwargs=True)]
    current: list[Tensor] = []  # the input read last, until its output is made

    def keep(x: Tensor) -> None:
        current[:] = [x]

    def made(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not current:
            raise RuntimeError(
                f"{site.output_module!r} ran without {site.input_module!r} giving it an input "
                "first; the masked-out term needs that input (call the whole model, not one "
                "sub-module)."
            )
        return fn(current.pop(), output)

    with removed_on_error([]) as handles:
        handles.append(input_hook(root, site, keep))
        handles.append(output_module.register_forward_hook(made))
    return handles


__all__ = [
    "CONV1D",
    "LINEAR",
    "input_hook",
    "label",
    "linear_sites",
    "masked_out_term",
    "module_kind",
    "removed_on_error",
    "watch",
]
