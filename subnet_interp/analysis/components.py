"""How much of each attention head and MLP neuron a subnetwork keeps.

Every function takes ``(model, subnetwork, ...)``; the old order ``(subnetwork, model, ...)``
still works, with a ``FutureWarning``.

Scores use the adapters' canonical axes (``head`` / ``kv_head`` / ``neuron``), so they work for
every supported family. A head's weights are its slices of ``W_Q``, ``W_K``, ``W_V`` (for
grouped-query attention, the shared K/V head counts for every query head that reads it) and
``W_O``; a neuron's are its ``W_in`` (and ``W_gate``) column and its ``W_out`` row.

What counts in :func:`head_scores` / :func:`neuron_scores`: by default each weight that is not
exactly zero counts once, and exact zeros do not count at all. A weight that is 0 can be dropped
for free (masking it changes nothing), so whether a mask keeps it says nothing about the unit;
counting it made units with many structural zeros (tracr-compiled models, pruned or sparse
checkpoints, zero-padded MLPs) look emptier than dense units no mask wanted, e.g. inverting the
ranking of compiled against planted-noise neurons. On a model without exact zeros this is the
plain kept fraction. ``weighted=True`` counts each weight by ``|theta|`` (zeros weigh 0 there
too); ``count_zeros=True`` gives the plain kept fraction of every weight, zeros included (the
mask's density in the unit, the definition before this change).

Across layers: a mask rarely keeps every layer at the same density (masks found on a tiny GPT-2
trained on IOI keep its layer-0 heads denser than its layer-1 heads), so kept fractions rank
heads well within a layer but can mis-rank them across layers. ``relative=True`` divides
each unit's kept amount by what it would keep at its layer's rate, weight matrix by weight
matrix: an enrichment ratio (observed / expected, as in enrichment analysis), 1 for a unit as
dense as its layer. It assumes a layer's density says nothing about which of its units matter;
a layer whose units all matter scores near 1 throughout (see ``benchmarks/README.md``,
"Trained models", for where each choice wins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .._fingerprint import read_canonical
from .._subnetwork import Subnetwork
from .._targets import targets as all_targets
from .._types import Target
from ._order import model_then_subnetwork
from .circuits import head_node, mlp_node


def _is_block_weight(target: Target, kind: str) -> bool:
    """Whether ``target`` is a canonical ``blocks.{L}.{kind}.W_*`` weight (``kind``: attn, mlp)."""
    component = target.component
    if component is None:
        return False
    parts = component.split(".")
    return len(parts) == 2 and parts[0] == kind and parts[1].startswith("W_")


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


def _layers_and_sizes(model: Any, subnetwork: Subnetwork, kind: str, axis_names: tuple[str, ...]):
    available = all_targets(model, include="*")
    entries = []
    for name, mask in subnetwork.masks.items():
        target = available.get(name)
        if target is None or not _is_block_weight(target, kind):
            continue
        axis = next((a for a in axis_names if a in target.axes), None)
        if axis is None:
            continue
        entries.append((target.layer, target, mask, target.axes.index(axis), axis))
    if not entries:
        raise ValueError(
            f"The subnetwork has no canonical {kind} targets with a {axis_names[0]} axis "
            f"(blocks.L.{kind}.W_*); it covers {list(subnetwork.names)[:8]}. Scores need a "
            "transformer family subnet_interp knows (see the README's model table: Hugging "
            "Face, TransformerLens, or nnsight wrappers of them)."
        )
    layers = [t.layer for t in available.values() if _is_block_weight(t, kind)]
    return 1 + max(layers), entries


def _check_modes(weighted: bool, count_zeros: bool, relative: bool = False) -> None:
    for name, value in (("weighted", weighted), ("count_zeros", count_zeros),
                        ("relative", relative)):  # fmt: skip
        if not isinstance(value, bool):
            raise TypeError(
                f"{name} must be True or False, got {value!r} ({type(value).__name__}); e.g. "
                f"head_scores(model, subnetwork, {name}=True)."
            )
    if weighted and count_zeros:
        raise ValueError(
            "weighted=True counts each weight by |theta|, so exact zeros weigh nothing; "
            "count_zeros=True (every weight counts once) cannot be combined with it."
        )


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


@model_then_subnetwork()
def head_scores(
    model: Any,
    subnetwork: Subnetwork,
    *,
    weighted: bool = False,
    count_zeros: bool = False,
    relative: bool = False,
) -> Float[Tensor, "layer head"]:
    """Fraction of each head's non-zero Q/K/V/O weights the subnetwork keeps, ``[layers, heads]``.

    Every non-zero weight of the head's slices of the canonical ``W_Q``, ``W_K``, ``W_V`` and
    ``W_O`` counts once; weights that are exactly 0 do not count (dropping them is free, so they
    say nothing about the head; see the module docstring). With grouped-query attention the
    slice of a shared K/V head counts for every query head that reads it. With
    ``weighted=True`` each weight counts by ``|theta|`` (the kept fraction of the head's weight
    mass), which also discounts small weights inside sparse heads (e.g. tracr-compiled ones).
    With ``count_zeros=True`` every weight counts once, zeros included (the mask's density in
    the head). Layers or heads the subnetwork does not cover, and heads with no non-zero
    weight (unless ``count_zeros``), are ``nan``.

    With ``relative=True`` scores are comparable across layers: the head's kept amount over
    what it would keep at its layer's kept fraction of each of ``W_Q``, ``W_K``, ``W_V``,
    ``W_O`` (counted as above), ``sum_W kept_h(W) / sum_W total_h(W) * kept(W) / total(W)``;
    1 means as dense as its layer, 2 twice as dense; 0 in a layer the mask removes entirely.
    """
    _check_modes(weighted, count_zeros, relative)
    n_layers, entries = _layers_and_sizes(model, subnetwork, "attn", ("head", "kv_head"))
    root = _root(model)
    query_heads = [e[2].shape[e[3]] for e in entries if e[4] == "head"]
    n_heads = max(query_heads) if query_heads else max(e[2].shape[e[3]] for e in entries)
    kept = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)  # 0 / 0 = nan where uncovered
    expected = torch.zeros_like(total) if relative else None
    for layer, target, mask, axis, axis_name in entries:
        weight = None if count_zeros else read_canonical(root, target).to(mask.device)
        k, t = _per_unit(mask, weight, axis, weighted)
        k, t = k.double().cpu(), t.double().cpu()
        if axis_name == "kv_head":  # shared by the query heads of its group
            group = n_heads // k.numel()
            k, t = k.repeat_interleave(group), t.repeat_interleave(group)
        kept[layer, : k.numel()] += k
        total[layer, : t.numel()] += t
        if expected is not None:
            expected[layer, : t.numel()] += t * _layer_rate(k, t)
    return _ratio(kept, total, expected)


@model_then_subnetwork()
def neuron_scores(
    model: Any,
    subnetwork: Subnetwork,
    *,
    weighted: bool = False,
    count_zeros: bool = False,
    relative: bool = False,
) -> Float[Tensor, "layer neuron"]:
    """Fraction of each MLP neuron's non-zero weights (``W_in``/``W_gate`` column, ``W_out``
    row) the subnetwork keeps, ``[layers, d_mlp]``.

    As in :func:`head_scores`: exact zeros do not count by default, ``weighted=True`` counts
    each weight by ``|theta|``, ``count_zeros=True`` counts every weight once, ``relative=True``
    divides by what the neuron would keep at its layer's kept fraction of each of ``W_in``
    (``W_gate``) and ``W_out`` (comparable across layers). ``nan`` where not covered, and for
    neurons with no non-zero weight (unless ``count_zeros``)."""
    _check_modes(weighted, count_zeros, relative)
    n_layers, entries = _layers_and_sizes(model, subnetwork, "mlp", ("neuron",))
    root = _root(model)
    width = max(e[2].shape[e[3]] for e in entries)
    kept = torch.zeros(n_layers, width, dtype=torch.float64)
    total = torch.zeros(n_layers, width, dtype=torch.float64)
    expected = torch.zeros_like(total) if relative else None
    for layer, target, mask, axis, _ in entries:
        weight = None if count_zeros else read_canonical(root, target).to(mask.device)
        k, t = _per_unit(mask, weight, axis, weighted)
        k, t = k.double().cpu(), t.double().cpu()
        kept[layer] += k
        total[layer] += t
        if expected is not None:
            expected[layer] += t * _layer_rate(k, t)
    return _ratio(kept, total, expected)


@dataclass(frozen=True)
class HeadOverlap:
    """Result of :func:`head_overlap`: per ``[layer, head]``, the fraction of the head's Q/K/V/O
    weights that both subnetworks keep (``shared``), only the first (``only_a``) or only the
    second (``only_b``); the rest neither keeps. ``nan`` where a head is not covered."""

    shared: Float[Tensor, "layer head"]
    only_a: Float[Tensor, "layer head"]
    only_b: Float[Tensor, "layer head"]


def head_overlap(model: Any, a: Subnetwork, b: Subnetwork) -> HeadOverlap:
    """Where two subnetworks of one model agree, head by head: the fraction of each head's
    weights in ``a & b``, ``a - b`` and ``b - a`` (every weight counted once, as
    :func:`head_scores` with ``count_zeros=True``). ``a`` and ``b`` must cover the same
    targets with the same shapes (as for ``a & b``)."""
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Subnetwork):
            raise TypeError(
                f"head_overlap(model, a, b) compares two si.Subnetwork objects; {name} is a "
                f"{type(value).__name__}. Load one with si.Subnetwork.load(path)."
            )
    parts = (a & b, a - b, b - a)
    shared, only_a, only_b = (head_scores(model, p, count_zeros=True) for p in parts)
    return HeadOverlap(shared, only_a, only_b)


def top_heads(scores: Tensor, k: int = 5) -> list[tuple[int, int, float]]:
    """The ``k`` highest-scoring heads as ``(layer, head, score)``, ``nan`` last."""
    flat = torch.nan_to_num(scores, nan=-1.0).flatten()
    order = flat.argsort(descending=True)[:k].tolist()
    heads = scores.shape[1]
    return [(i // heads, i % heads, float(scores.flatten()[i])) for i in order]


def _root(model: Any):
    from .. import adapters

    return adapters.resolve(model).root(model)


def _stacked(model: Any, subnetwork: Subnetwork | None, letter: str) -> Tensor:
    """Canonical ``W_<letter>`` of every layer, masked, as ``[layers, heads, ...]`` (K/V of
    grouped-query attention repeated for the query heads that share them)."""
    from .. import adapters

    adapter = adapters.resolve(model)
    root, found = adapter.root(model), adapter.all_targets(model)
    layers = sorted({t.layer for t in found.values() if _is_block_weight(t, "attn")})
    if not layers:
        raise ValueError(
            "Edge scores need canonical attention weights (blocks.L.attn.W_Q ...); this model "
            f"has none, its weights are {list(found)[:6]}. They need a transformer family "
            "subnet_interp knows (see the README's model table: Hugging Face, TransformerLens, "
            "or nnsight wrappers of them)."
        )
    out = []
    for layer in layers:
        name = f"blocks.{layer}.attn.W_{letter}"
        if name not in found:
            raise ValueError(f"edge_scores needs canonical attention weights; {name!r} is missing.")
        weight = read_canonical(root, found[name]).detach().double()
        if subnetwork is not None and name in subnetwork:
            weight = weight * subnetwork[name].to(weight.device)
        heads = found[f"blocks.{layer}.attn.W_Q"].shape[0]
        if weight.shape[0] != heads:
            weight = weight.repeat_interleave(heads // weight.shape[0], dim=0)
        out.append(weight)
    return torch.stack(out)


@model_then_subnetwork()
def edge_scores(
    model: Any, subnetwork: Subnetwork | None, kind: str = "v"
) -> Float[Tensor, "layer_a head_a layer_b head_b"]:
    """Composition scores between heads (Elhage et al. 2021) of the masked weights:
    ``||W_OV^A W^B||_F / (||W_OV^A||_F ||W^B||_F)`` with ``W^B`` = ``W_QK^B`` (``kind="q"``),
    ``W_QK^B.T`` (``"k"``) or ``W_OV^B`` (``"v"``), for every head A in an earlier layer than B
    (``nan`` otherwise); ``subnetwork=None`` scores the unmasked model. Computed from
    ``d_head``-sized factors, never from ``d_model``-squared products, so it is vectorised over
    all pairs.
    """
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}.")
    wq, wk, wv, wo = (_stacked(model, subnetwork, x) for x in "QKVO")
    n_layers, n_heads = wq.shape[:2]
    flat = lambda t: t.flatten(0, 1)  # noqa: E731
    q, k, v, o = flat(wq), flat(wk), flat(wv), flat(wo)  # [N, d, dh] x3, [N, dh, d]
    gram_v = v.transpose(1, 2) @ v  # V^T V      [N, dh, dh]
    gram_o = o @ o.transpose(1, 2)  # O O^T      [N, dh, dh]
    if kind == "q":
        middle = torch.einsum("aij,bjk->abik", o, q)
        right_gram, right_norm2 = (
            k.transpose(1, 2) @ k,
            _trace(q.transpose(1, 2) @ q, k.transpose(1, 2) @ k),
        )
    elif kind == "k":
        middle = torch.einsum("aij,bjk->abik", o, k)
        right_gram, right_norm2 = (
            q.transpose(1, 2) @ q,
            _trace(q.transpose(1, 2) @ q, k.transpose(1, 2) @ k),
        )
    else:
        middle = torch.einsum("aij,bjk->abik", o, v)
        right_gram, right_norm2 = gram_o, _trace(gram_v, gram_o)
    # ||V_A M K_B^T||_F^2 = tr(M^T (V_A^T V_A) M (K_B^T K_B)), etc.
    product = torch.einsum("abji,ajk,abkl,bli->ab", middle, gram_v, middle, right_gram)
    left_norm2 = _trace(gram_v, gram_o)
    denominator = (left_norm2[:, None] * right_norm2[None, :]).sqrt()
    # a head whose masked weights are all zero composes with nothing: score 0, not 0 / 0
    ratio = product.clamp(min=0).sqrt() / denominator.clamp(min=1e-300)
    scores = torch.where(denominator > 0, ratio, torch.zeros_like(ratio)).view(
        n_layers, n_heads, n_layers, n_heads
    )
    layer = torch.arange(n_layers)
    earlier = (layer[:, None] < layer[None, :])[:, None, :, None].expand_as(scores)
    return torch.where(earlier, scores, torch.full_like(scores, float("nan"))).float()


def _canonical(model: Any, subnetwork: Subnetwork | None, name: str) -> Tensor | None:
    from .. import adapters

    adapter = adapters.resolve(model)
    found = adapter.all_targets(model)
    if name not in found:
        return None
    weight = read_canonical(adapter.root(model), found[name]).detach().double()
    if subnetwork is not None and name in subnetwork:
        weight = weight * subnetwork[name].to(weight.device)
    return weight


@model_then_subnetwork()
def graph_edge_scores(
    model: Any, subnetwork: Subnetwork | None, *, chunk: int = 64
) -> dict[tuple[str, str], float]:
    """Weight-based strength of every edge between heads and MLPs, from the masked weights:
    for source ``s`` writing ``W_s`` into the residual stream and destination input ``t`` reading
    it through ``R_t``, ``||W_s R_t||_F / (||W_s||_F ||R_t||_F)``.

    Sources: a head's ``W_OV`` and an MLP's ``W_out``. Destinations: a head's query input
    (``R = W_QK``), key input (``R = W_QK^T``), value input (``R = W_OV``), named
    ``blocks.L.attn.head.H.q|k|v`` as in :class:`Circuit` edges, and an MLP's ``W_in`` (with
    ``W_gate``). For head pairs these are the composition scores of Elhage et al. 2021 (as in
    :func:`edge_scores`), extended to MLPs. Every edge goes forward (MLP ``L`` reads heads of
    layer ``L``); keys follow ``si.analysis.circuit_formats.all_edges`` without embed/unembed.
    ``subnetwork=None`` scores the unmasked model.

    Computed as ``<W_s^T W_s, R_t R_t^T>`` between ``d_model``-square Gram matrices, one matmul
    per group of at most ``chunk`` destinations, vectorised over all sources: memory is the
    sources' Grams (``S x d_model^2`` doubles, about 0.7 GB for GPT-2-small) plus one group.
    """
    wq, wk, wv, wo = (_stacked(model, subnetwork, x) for x in "QKVO")
    n_layers, n_heads = wq.shape[0], wq.shape[1]
    mlps = {}
    for layer in range(n_layers):
        w_in = _canonical(model, subnetwork, f"blocks.{layer}.mlp.W_in")
        w_out = _canonical(model, subnetwork, f"blocks.{layer}.mlp.W_out")
        if w_in is not None and w_out is not None:
            mlps[layer] = (w_in, w_out, _canonical(model, subnetwork, f"blocks.{layer}.mlp.W_gate"))
    # sources, in forward order: heads of layer L at position 2L, its MLP at 2L + 1
    grams_src, names_src, src_pos = [], [], []
    for layer in range(n_layers):
        v, o = wv[layer], wo[layer]  # [H, d, dh], [H, dh, d]
        grams_src.append(o.transpose(1, 2) @ (v.transpose(1, 2) @ v) @ o)  # (V O)^T (V O)
        names_src += [head_node(layer, h) for h in range(n_heads)]
        src_pos += [2 * layer] * n_heads
        if layer in mlps:
            w_out = mlps[layer][1]
            grams_src.append((w_out.T @ w_out)[None])
            names_src.append(mlp_node(layer))
            src_pos.append(2 * layer + 1)
    src = torch.cat(grams_src).flatten(1)  # [S, d*d]
    src_trace = src.view(-1, *grams_src[0].shape[1:]).diagonal(dim1=1, dim2=2).sum(1)
    del grams_src
    positions = torch.tensor(src_pos)

    def destinations():
        """(names, forward position, Gram matrices) of each group of destination inputs, made
        one group at a time so that only one group's ``[n, d, d]`` block is alive."""
        for layer in range(n_layers):
            q, k, v, o = wq[layer], wk[layer], wv[layer], wo[layer]
            for port, left, middle in (
                ("q", q, k.transpose(1, 2) @ k),  # W_QK W_QK^T
                ("k", k, q.transpose(1, 2) @ q),  # W_QK^T W_QK
                ("v", v, o @ o.transpose(1, 2)),  # W_OV W_OV^T
            ):
                names = [head_node(layer, h, port) for h in range(n_heads)]
                for lo in range(0, n_heads, chunk):
                    part = left[lo : lo + chunk]
                    gram = part @ middle[lo : lo + chunk] @ part.transpose(1, 2)
                    yield names[lo : lo + chunk], 2 * layer, gram
            if layer in mlps:
                w_in, _, gate = mlps[layer]
                read = w_in @ w_in.T + (gate @ gate.T if gate is not None else 0)
                yield [mlp_node(layer)], 2 * layer + 1, read[None]

    out: dict[tuple[str, str], float] = {}
    for names, position, gram in destinations():
        numerator = src @ gram.flatten(1).T  # [S, n]
        trace = gram.diagonal(dim1=1, dim2=2).sum(1)
        denominator = (src_trace[:, None] * trace[None, :]).sqrt()
        ratio = numerator.clamp(min=0).sqrt() / denominator.clamp(min=1e-300)
        ratio = torch.where(denominator > 0, ratio, torch.zeros_like(ratio)).tolist()
        earlier = (positions < position).nonzero().flatten().tolist()
        for j, name in enumerate(names):
            for i in earlier:
                out[(names_src[i], name)] = ratio[i][j]
    return out


def _trace(a: Tensor, b: Tensor) -> Tensor:
    """``tr(a_i b_i)`` for batches of square matrices."""
    return (a * b.transpose(1, 2)).sum((1, 2))


__all__ = [
    "HeadOverlap",
    "edge_scores",
    "graph_edge_scores",
    "head_overlap",
    "head_scores",
    "neuron_scores",
    "top_heads",
]
