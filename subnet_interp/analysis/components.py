"""How much of each attention head and MLP neuron a subnetwork keeps.

Scores use the adapters' canonical axes (``head`` / ``kv_head`` / ``neuron``), so they work for
every supported family. A head's weights are its slices of ``W_Q``, ``W_K``, ``W_V`` (for
grouped-query attention, the shared K/V head counts for every query head that reads it) and
``W_O``; a neuron's are its ``W_in`` (and ``W_gate``) column and its ``W_out`` row.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .._fingerprint import read_canonical
from .._subnetwork import Subnetwork
from .._targets import targets as all_targets

_BLOCK = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.(W_\w+)$")


def _per_unit(mask: Tensor, weight: Tensor | None, axis: int) -> tuple[Tensor, Tensor]:
    """Kept amount and total per index of ``axis`` (weighted by ``|weight|`` if given)."""
    mass = (
        torch.ones_like(mask, dtype=torch.float32)
        if weight is None
        else weight.detach().abs().float()
    )
    kept = (mass * mask).movedim(axis, 0).flatten(1).sum(1)
    total = mass.movedim(axis, 0).flatten(1).sum(1)
    return kept, total


def _layers_and_sizes(subnetwork: Subnetwork, model: Any, kind: str, axis_names: tuple[str, ...]):
    available = all_targets(model, include="*")
    entries = []
    for name, mask in subnetwork.masks.items():
        match = _BLOCK.match(name)
        target = available.get(name)
        if match is None or target is None or match.group(2) != kind:
            continue
        axis = next((a for a in axis_names if a in target.axes), None)
        if axis is None:
            continue
        entries.append((int(match.group(1)), target, mask, target.axes.index(axis), axis))
    if not entries:
        raise ValueError(
            f"The subnetwork has no canonical {kind} targets with a {axis_names[0]} axis "
            f"(blocks.L.{kind}.W_*); it covers {list(subnetwork.names)[:8]}. Scores need a "
            "transformer family subnet_interp knows (Hugging Face GPT-2 / GPT-NeoX / Llama, "
            "TransformerLens, or nnsight wrappers of them)."
        )
    layers = [int(m.group(1)) for m in map(_BLOCK.match, available) if m and m.group(2) == kind]
    return 1 + max(layers), entries


def head_scores(
    subnetwork: Subnetwork, model: Any, *, weighted: bool = False
) -> Float[Tensor, "layer head"]:
    """Fraction of each head's Q/K/V/O weights the subnetwork keeps, ``[layers, heads]``.

    With ``weighted=True`` each weight counts by ``|theta|`` (the kept fraction of the head's
    weight mass), which suits models whose heads are sparse inside (e.g. tracr-compiled ones).
    Layers or heads the subnetwork does not cover are ``nan``.
    """
    n_layers, entries = _layers_and_sizes(subnetwork, model, "attn", ("head", "kv_head"))
    root = _root(model)
    query_heads = [e[2].shape[e[3]] for e in entries if e[4] == "head"]
    n_heads = max(query_heads) if query_heads else max(e[2].shape[e[3]] for e in entries)
    kept = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)  # 0 / 0 = nan where uncovered
    for layer, target, mask, axis, axis_name in entries:
        weight = read_canonical(root, target).to(mask.device) if weighted else None
        k, t = _per_unit(mask, weight, axis)
        k, t = k.double().cpu(), t.double().cpu()
        if axis_name == "kv_head":  # shared by the query heads of its group
            group = n_heads // k.numel()
            k, t = k.repeat_interleave(group), t.repeat_interleave(group)
        kept[layer, : k.numel()] += k
        total[layer, : t.numel()] += t
    return (kept / total).float()


def neuron_scores(
    subnetwork: Subnetwork, model: Any, *, weighted: bool = False
) -> Float[Tensor, "layer neuron"]:
    """Fraction of each MLP neuron's weights (``W_in``/``W_gate`` column, ``W_out`` row) kept,
    ``[layers, d_mlp]`` (``nan`` where not covered)."""
    n_layers, entries = _layers_and_sizes(subnetwork, model, "mlp", ("neuron",))
    root = _root(model)
    width = max(e[2].shape[e[3]] for e in entries)
    kept = torch.zeros(n_layers, width, dtype=torch.float64)
    total = torch.zeros(n_layers, width, dtype=torch.float64)
    for layer, target, mask, axis, _ in entries:
        weight = read_canonical(root, target).to(mask.device) if weighted else None
        k, t = _per_unit(mask, weight, axis)
        kept[layer] += k.double().cpu()
        total[layer] += t.double().cpu()
    return (kept / total).float()


def top_heads(scores: Tensor, k: int = 5) -> list[tuple[int, int, float]]:
    """The ``k`` highest-scoring heads as ``(layer, head, score)``, ``nan`` last."""
    flat = torch.nan_to_num(scores, nan=-1.0).flatten()
    order = flat.argsort(descending=True)[:k].tolist()
    heads = scores.shape[1]
    return [(i // heads, i % heads, float(scores.flatten()[i])) for i in order]


def _root(model: Any):
    from .. import adapters

    return adapters.resolve(model).root(model)


__all__ = ["head_scores", "neuron_scores", "top_heads"]
