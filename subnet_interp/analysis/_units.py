"""Per-unit kept amounts (heads, neurons) of a subnetwork, grouped by where the units live.

A group is the sub-layer kind of the canonical block names: ``attn`` / ``mlp`` for the
decoder-only and encoder families (``blocks.{L}.attn.W_Q``), and the stack with it for an
encoder-decoder (``encoder.attn``, ``decoder.attn``, ``decoder.cross_attn``, ``encoder.mlp``,
``decoder.mlp`` for ``decoder.blocks.{L}.cross_attn.W_Q`` ...), so that head ``(L, H)`` of
the encoder, of the decoder's self-attention and of its cross-attention are told apart.
:func:`unit_scores` scores each group as ``[layer, unit]`` (see ``components.head_scores``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._fingerprint import read_canonical
from .._subnetwork import Subnetwork
from .._targets import targets as all_targets
from .._types import Target, stack_position

_WEIGHT = re.compile(r"^(attn|cross_attn|mlp)\.W_[^.]*$")  # no expert weights (mlp.experts.E.*)


def unit_group(name: str, kinds: tuple[str, ...]) -> tuple[str, int] | None:
    """``(group, layer)`` of a canonical block weight matrix of one of ``kinds`` (``attn``,
    ``cross_attn``, ``mlp``): ``("attn", 3)`` for ``blocks.3.attn.W_Q``,
    ``("decoder.cross_attn", 1)`` for ``decoder.blocks.1.cross_attn.W_O``; ``None`` otherwise."""
    position = stack_position(name)
    if position is None:
        return None
    stack, layer, component = position
    match = _WEIGHT.match(component)
    if match is None or match.group(1) not in kinds:
        return None
    return (f"{stack}.{match.group(1)}" if stack else match.group(1)), layer


def _per_unit(
    mask: Tensor, weight: Tensor | None, axis: int, weighted: bool = False
) -> tuple[Tensor, Tensor]:
    """Kept amount and total per index of ``axis``: every weight counts once if ``weight`` is
    ``None``; else ``|weight|`` if ``weighted``, else 1 for each non-zero weight and 0 for an
    exact zero."""
    if weight is None:
        mass = torch.ones_like(mask, dtype=torch.float32)
    elif weighted:
        mass = weight.detach().abs().float()
    else:
        mass = (weight.detach() != 0).float()
    kept = (mass * mask).movedim(axis, 0).flatten(1).sum(1)
    total = mass.movedim(axis, 0).flatten(1).sum(1)
    return kept, total


def _ratio(kept: Tensor, total: Tensor, expected: Tensor | None) -> Tensor:
    """Kept fraction (``expected`` None) or kept / expected; a unit of a layer that keeps
    nothing scores 0 (it keeps nothing either), an uncovered unit ``nan``."""
    if expected is None:
        return (kept / total).float()
    ratio = kept / expected
    return torch.where((total > 0) & (expected == 0), torch.zeros_like(ratio), ratio).float()


def _layer_rate(k: Tensor, t: Tensor) -> Tensor:
    """The kept fraction of one weight matrix (0 where it has no counted weight)."""
    whole = t.sum()
    return k.sum() / whole if whole > 0 else whole


def _entry(target: Target, mask: Tensor | None, layer: int, axis_names: tuple[str, ...]):
    axis = next((a for a in axis_names if a in target.axes), None)
    if axis is None:
        return None
    return layer, target, mask, target.axes.index(axis), axis


def _width(entries: list, axis_names: tuple[str, ...]) -> int:
    """The number of units: the widest axis of the first kind (query heads), else any."""
    first = [e[1].shape[e[3]] for e in entries if e[4] == axis_names[0]]
    return max(first) if first else max(e[1].shape[e[3]] for e in entries)


def _score_group(root, n_layers: int, entries: list, width: int, modes: Mapping[str, bool]):
    kept = torch.zeros(n_layers, width, dtype=torch.float64)
    total = torch.zeros(n_layers, width, dtype=torch.float64)  # 0 / 0 = nan where uncovered
    expected = torch.zeros_like(total) if modes["relative"] else None
    for layer, target, mask, axis, axis_name in entries:
        weight = None if modes["count_zeros"] else read_canonical(root, target).to(mask.device)
        k, t = _per_unit(mask, weight, axis, modes["weighted"])
        k, t = k.double().cpu(), t.double().cpu()
        if axis_name == "kv_head":  # shared by the query heads of its group
            group = width // k.numel()
            k, t = k.repeat_interleave(group), t.repeat_interleave(group)
        kept[layer, : k.numel()] += k
        total[layer, : t.numel()] += t
        if expected is not None:
            expected[layer, : t.numel()] += t * _layer_rate(k, t)
    return _ratio(kept, total, expected)


def unit_scores(
    model: Any,
    subnetwork: Subnetwork,
    kinds: tuple[str, ...],
    axis_names: tuple[str, ...],
    modes: Mapping[str, bool],
) -> Tensor | dict[str, Tensor]:
    """``[layer, unit]`` scores of the units on ``axis_names`` (``("head", "kv_head")`` or
    ``("neuron",)``) of the ``kinds`` sub-layers: one tensor for a model without stacks, a
    dict group -> tensor (every group the model has; ``nan`` where the subnetwork does not
    cover it) for an encoder-decoder. ``modes``: ``weighted``, ``count_zeros``, ``relative``."""
    from .. import adapters

    available = all_targets(model, include="*")
    layers: dict[str, int] = {}
    everything: dict[str, list] = {}  # group -> entries of all its targets, for their widths
    for name, target in available.items():
        found = unit_group(name, kinds)
        if found is not None:
            layers[found[0]] = max(layers.get(found[0], 0), found[1] + 1)
            entry = _entry(target, None, found[1], axis_names)
            if entry is not None:
                everything.setdefault(found[0], []).append(entry)
    covered: dict[str, list] = {group: [] for group in layers}
    for name, mask in subnetwork.masks.items():
        found = unit_group(name, kinds) if name in available else None
        entry = None if found is None else _entry(available[name], mask, found[1], axis_names)
        if entry is not None:
            covered[found[0]].append(entry)
    if not any(covered.values()):
        kind = kinds[0]
        raise ValueError(
            f"The subnetwork has no canonical {kind} targets with a {axis_names[0]} axis "
            f"(blocks.L.{kind}.W_*, or an encoder-decoder's encoder.blocks.L.{kind}.W_* ...); it "
            f"covers {list(subnetwork.names)[:8]}. Scores need a transformer family "
            "subnet_interp knows (see the README's model table: Hugging Face, TransformerLens, "
            "or nnsight wrappers of them)."
        )
    root = adapters.resolve(model).root(model)
    scores = {}
    for group, n_layers in layers.items():
        entries = covered[group]
        if entries or group in everything:  # a group whose weights have no unit axis has no units
            width = _width(entries or everything[group], axis_names)
            scores[group] = _score_group(root, n_layers, entries, width, modes)
    if all("." not in group for group in scores):  # no stacks: the one group's tensor
        return next(scores[group] for group in scores if covered[group])
    return scores


__all__ = ["unit_group", "unit_scores"]
