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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .._fingerprint import read_canonical
from .._subnetwork import Subnetwork
from .._types import Target
from ._order import model_then_subnetwork
from ._units import unit_group, unit_scores
from .circuits import head_node, mlp_node


def _is_block_weight(target: Target, kind: str) -> bool:
    """Whether ``target`` is a canonical ``blocks.{L}.{kind}.W_*`` weight (``kind``: attn, mlp)."""
    component = target.component
    if component is None:
        return False
    parts = component.split(".")
    return len(parts) == 2 and parts[0] == kind and parts[1].startswith("W_")


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


@model_then_subnetwork()
def head_scores(
    model: Any,
    subnetwork: Subnetwork,
    *,
    weighted: bool = False,
    count_zeros: bool = False,
    relative: bool = False,
) -> Float[Tensor, "layer head"] | dict[str, Float[Tensor, "_layer _head"]]:
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

    Of an encoder-decoder (T5, BART, ...) the result is a dict of such ``[layers, heads]``
    tensors, one per attention kind, keyed by its canonical names without the block:
    ``"encoder.attn"`` (``encoder.blocks.{L}.attn.W_*``), ``"decoder.attn"`` (the decoder's
    self-attention) and ``"decoder.cross_attn"``; ``scores["decoder.cross_attn"][L, H]`` is
    head ``H`` of ``decoder.blocks.{L}.cross_attn``. Every kind the model has is a key (all
    ``nan`` where the subnetwork covers none of it).
    """
    _check_modes(weighted, count_zeros, relative)
    modes = {"weighted": weighted, "count_zeros": count_zeros, "relative": relative}
    return unit_scores(model, subnetwork, ("attn", "cross_attn"), ("head", "kv_head"), modes)


@model_then_subnetwork()
def neuron_scores(
    model: Any,
    subnetwork: Subnetwork,
    *,
    weighted: bool = False,
    count_zeros: bool = False,
    relative: bool = False,
) -> Float[Tensor, "layer neuron"] | dict[str, Float[Tensor, "_layer _neuron"]]:
    """Fraction of each MLP neuron's non-zero weights (``W_in``/``W_gate`` column, ``W_out``
    row) the subnetwork keeps, ``[layers, d_mlp]``.

    As in :func:`head_scores`: exact zeros do not count by default, ``weighted=True`` counts
    each weight by ``|theta|``, ``count_zeros=True`` counts every weight once, ``relative=True``
    divides by what the neuron would keep at its layer's kept fraction of each of ``W_in``
    (``W_gate``) and ``W_out`` (comparable across layers). ``nan`` where not covered, and for
    neurons with no non-zero weight (unless ``count_zeros``). Of an encoder-decoder, a dict
    ``{"encoder.mlp": [layers, d_mlp], "decoder.mlp": ...}`` (as :func:`head_scores`)."""
    _check_modes(weighted, count_zeros, relative)
    modes = {"weighted": weighted, "count_zeros": count_zeros, "relative": relative}
    return unit_scores(model, subnetwork, ("mlp",), ("neuron",), modes)


@dataclass(frozen=True)
class HeadOverlap:
    """Result of :func:`head_overlap`: per ``[layer, head]``, the fraction of the head's Q/K/V/O
    weights that both subnetworks keep (``shared``), only the first (``only_a``) or only the
    second (``only_b``); the rest neither keeps. ``nan`` where a head is not covered. Of an
    encoder-decoder, each is a dict of them keyed as :func:`head_scores` keys its result."""

    shared: Float[Tensor, "layer head"] | dict[str, Float[Tensor, "_layer _head"]]
    only_a: Float[Tensor, "layer head"] | dict[str, Float[Tensor, "_layer _head"]]
    only_b: Float[Tensor, "layer head"] | dict[str, Float[Tensor, "_layer _head"]]


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


def top_heads(
    scores: Tensor | Mapping[str, Tensor], k: int = 5
) -> list[tuple[int, int, float]] | list[tuple[str, int, int, float]]:
    """The ``k`` highest-scoring heads as ``(layer, head, score)``, ``nan`` last; of an
    encoder-decoder's scores (a dict, see :func:`head_scores`), across all its attention kinds
    as ``(key, layer, head, score)``, e.g. ``("decoder.cross_attn", 1, 2, 0.9)``."""
    if isinstance(scores, Mapping):
        found = [(group, *head) for group, value in scores.items() for head in _ranked(value)]
        found.sort(key=lambda entry: -entry[3] if entry[3] == entry[3] else float("inf"))
        return found[:k]
    return _ranked(scores, k)


def _ranked(scores: Tensor, k: int | None = None) -> list[tuple[int, int, float]]:
    flat = torch.nan_to_num(scores, nan=-1.0).flatten()
    order = flat.argsort(descending=True)[:k].tolist()
    heads = scores.shape[1]
    return [(i // heads, i % heads, float(scores.flatten()[i])) for i in order]


def _root(model: Any):
    from .. import adapters

    return adapters.resolve(model).root(model)


def _stacked(model: Any, subnetwork: Subnetwork | None, letter: str, group: str = "attn") -> Tensor:
    """Canonical ``W_<letter>`` of every layer of one attention kind (``group``: ``attn``, or
    an encoder-decoder's ``encoder.attn``, ``decoder.attn``, ``decoder.cross_attn``), masked,
    as ``[layers, heads, ...]`` (K/V of grouped-query attention repeated for the query heads
    that share them)."""
    from .. import adapters

    adapter = adapters.resolve(model)
    root, found = adapter.root(model), adapter.all_targets(model)
    prefixes = {}  # layer -> "<stack.>blocks.L.<kind>.W_"
    for name in found:
        position = unit_group(name, ("attn", "cross_attn"))
        if position is not None and position[0] == group:
            prefixes[position[1]] = name[: name.rindex(".W_") + 3]
    if not prefixes:
        raise ValueError(
            "Edge scores need canonical attention weights (blocks.L.attn.W_Q ...); this model "
            f"has none, its weights are {list(found)[:6]}. They need a transformer family "
            "subnet_interp knows (see the README's model table: Hugging Face, TransformerLens, "
            "or nnsight wrappers of them)."
        )
    out = []
    for layer in sorted(prefixes):
        name = f"{prefixes[layer]}{letter}"
        if name not in found:
            raise ValueError(f"edge_scores needs canonical attention weights; {name!r} is missing.")
        weight = read_canonical(root, found[name]).detach().double()
        if subnetwork is not None and name in subnetwork:
            weight = weight * subnetwork[name].to(weight.device)
        heads = found[f"{prefixes[layer]}Q"].shape[0]
        if weight.shape[0] != heads:
            weight = weight.repeat_interleave(heads // weight.shape[0], dim=0)
        out.append(weight)
    return torch.stack(out)


def _composition(source: tuple[Tensor, Tensor], reader: tuple[Tensor, ...], kind: str) -> Tensor:
    """``[A, B]`` composition scores of source heads ``(W_V, W_O)`` (``[A, d, dh]``,
    ``[A, dh, d]``) into reader heads ``(W_Q, W_K, W_V, W_O)`` through the reader's ``kind``
    input (see :func:`edge_scores`), from ``d_head``-sized factors."""
    v_a, o_a = source
    q, k, v, o = reader
    gram_v = v_a.transpose(1, 2) @ v_a  # V^T V      [A, dh, dh]
    left_norm2 = _trace(gram_v, o_a @ o_a.transpose(1, 2))
    if kind == "q":
        middle, right_gram = torch.einsum("aij,bjk->abik", o_a, q), k.transpose(1, 2) @ k
        right_norm2 = _trace(q.transpose(1, 2) @ q, right_gram)
    elif kind == "k":
        middle, right_gram = torch.einsum("aij,bjk->abik", o_a, k), q.transpose(1, 2) @ q
        right_norm2 = _trace(right_gram, k.transpose(1, 2) @ k)
    else:
        middle, right_gram = torch.einsum("aij,bjk->abik", o_a, v), o @ o.transpose(1, 2)
        right_norm2 = _trace(v.transpose(1, 2) @ v, right_gram)
    # ||V_A M K_B^T||_F^2 = tr(M^T (V_A^T V_A) M (K_B^T K_B)), etc.
    product = torch.einsum("abji,ajk,abkl,bli->ab", middle, gram_v, middle, right_gram)
    denominator = (left_norm2[:, None] * right_norm2[None, :]).sqrt()
    # a head whose masked weights are all zero composes with nothing: score 0, not 0 / 0
    ratio = product.clamp(min=0).sqrt() / denominator.clamp(min=1e-300)
    return torch.where(denominator > 0, ratio, torch.zeros_like(ratio))


def _pair_scores(weights: dict, source: str, reader: str, kind: str, before) -> Tensor:
    """``[layer_a, head_a, layer_b, head_b]`` composition of ``source`` heads into ``reader``
    heads; ``nan`` where ``before(layer_a, layer_b)`` is false (A does not run before B)."""
    (_, _, v_a, o_a), b = weights[source], weights[reader]
    flat = tuple(w.flatten(0, 1) for w in b)
    scores = _composition((v_a.flatten(0, 1), o_a.flatten(0, 1)), flat, kind)
    scores = scores.view(*v_a.shape[:2], *b[0].shape[:2])
    earlier = before(torch.arange(v_a.shape[0])[:, None], torch.arange(b[0].shape[0])[None, :])
    earlier = earlier[:, None, :, None].expand_as(scores)
    return torch.where(earlier, scores, torch.full_like(scores, float("nan"))).float()


# (source, reader, the reader's inputs that read the stream the source writes, whether source
# layer a runs before reader layer b): the decoder's block L runs self-attention, then
# cross-attention, whose keys and values read the encoder's output and queries the decoder's
_SEQ2SEQ_EDGES = (
    ("encoder.attn", "encoder.attn", "qkv", lambda a, b: a < b),
    ("encoder.attn", "decoder.cross_attn", "kv", lambda a, b: a >= 0),
    ("decoder.attn", "decoder.attn", "qkv", lambda a, b: a < b),
    ("decoder.attn", "decoder.cross_attn", "q", lambda a, b: a <= b),
    ("decoder.cross_attn", "decoder.attn", "qkv", lambda a, b: a < b),
    ("decoder.cross_attn", "decoder.cross_attn", "q", lambda a, b: a < b),
)


@model_then_subnetwork()
def edge_scores(
    model: Any, subnetwork: Subnetwork | None, kind: str = "v"
) -> (
    Float[Tensor, "layer_a head_a layer_b head_b"]
    | dict[tuple[str, str], Float[Tensor, "_layer_a _head_a _layer_b _head_b"]]
):
    """Composition scores between heads (Elhage et al. 2021) of the masked weights:
    ``||W_OV^A W^B||_F / (||W_OV^A||_F ||W^B||_F)`` with ``W^B`` = ``W_QK^B`` (``kind="q"``),
    ``W_QK^B.T`` (``"k"``) or ``W_OV^B`` (``"v"``), for every head A in an earlier layer than B
    (``nan`` otherwise); ``subnetwork=None`` scores the unmasked model. Computed from
    ``d_head``-sized factors, never from ``d_model``-squared products, so it is vectorised over
    all pairs.

    Of an encoder-decoder (two residual streams), a dict keyed ``(source, reader)`` by the
    attention kinds :func:`head_scores` names, each ``[layer_a, head_a, layer_b, head_b]``,
    for the pairs where B's ``kind`` input reads the stream A writes: within the encoder;
    encoder heads into the decoder's cross-attention (``"k"``, ``"v"``; every encoder layer
    counts as earlier, its output is what they read); within the decoder, self- and
    cross-attention heads into later self-attention and, through queries only (``"q"``), into
    cross-attention (of the same block too: self-attention runs first). Norms between the
    streams are left out, as everywhere here.
    """
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}.")
    groups = _attention_groups(model)
    if any("." in group for group in groups):
        weights = {g: tuple(_stacked(model, subnetwork, x, g) for x in "QKVO") for g in groups}
        return {
            (source, reader): _pair_scores(weights, source, reader, kind, before)
            for source, reader, inputs, before in _SEQ2SEQ_EDGES
            if kind in inputs and source in weights and reader in weights
        }
    weights = {"attn": tuple(_stacked(model, subnetwork, x) for x in "QKVO")}
    return _pair_scores(weights, "attn", "attn", kind, lambda a, b: a < b)


def _attention_groups(model: Any) -> list[str]:
    """The attention kinds of ``model`` (``["attn"]``, or an encoder-decoder's), in order."""
    from .. import adapters

    found = adapters.resolve(model).all_targets(model)
    groups = (unit_group(name, ("attn", "cross_attn")) for name in found)
    return list(dict.fromkeys(group[0] for group in groups if group is not None))


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


def is_parallel_attn_mlp(model: Any) -> bool:
    """Whether each block's MLP reads the block's input, as its attention does, instead of the
    attention's output (GPT-NeoX / Pythia with ``use_parallel_residual``, GPT-J, Phi-1/2,
    Falcon's parallel blocks, CodeGen; TransformerLens ``cfg.parallel_attn_mlp``): then no
    head of block ``L`` feeds MLP ``L``."""
    from .. import adapters

    for holder in (model, adapters.resolve(model).root(model)):
        flag = getattr(getattr(holder, "cfg", None), "parallel_attn_mlp", None)
        if isinstance(flag, bool):
            return flag
        config = getattr(holder, "config", None)
        if config is None:
            continue
        for name in ("use_parallel_residual", "parallel_attn"):
            if isinstance(getattr(config, name, None), bool):
                return bool(getattr(config, name))
        if getattr(config, "model_type", None) in ("gptj", "phi", "codegen"):
            return True
    return False


@model_then_subnetwork()
def graph_edge_scores(
    model: Any,
    subnetwork: Subnetwork | None,
    *,
    chunk: int = 64,
    parallel_attn_mlp: bool | None = None,
) -> dict[tuple[str, str], float]:
    """Weight-based strength of every edge between heads and MLPs, from the masked weights:
    for source ``s`` writing ``W_s`` into the residual stream and destination input ``t`` reading
    it through ``R_t``, ``||W_s R_t||_F / (||W_s||_F ||R_t||_F)``.

    Sources: a head's ``W_OV`` and an MLP's ``W_out``. Destinations: a head's query input
    (``R = W_QK``), key input (``R = W_QK^T``), value input (``R = W_OV``), named
    ``blocks.L.attn.head.H.q|k|v`` as in :class:`Circuit` edges, and an MLP's ``W_in`` (with
    ``W_gate``). For head pairs these are the composition scores of Elhage et al. 2021 (as in
    :func:`edge_scores`), extended to MLPs. Every edge goes forward: MLP ``L`` reads heads of
    layer ``L``, except in a model whose blocks run attention and MLP in parallel
    (``parallel_attn_mlp``; default: :func:`is_parallel_attn_mlp` of the model, e.g. True for
    GPT-NeoX / Pythia), where it reads only earlier blocks. Keys follow ``si.analysis.circuit_formats.all_edges`` (with the
    same ``parallel_attn_mlp``) without embed/unembed. ``subnetwork=None`` scores the unmasked
    model.

    Computed as ``<W_s^T W_s, R_t R_t^T>`` between ``d_model``-square Gram matrices, one matmul
    per group of at most ``chunk`` destinations, vectorised over all sources: memory is the
    sources' Grams (``S x d_model^2`` doubles, about 0.7 GB for GPT-2-small) plus one group.
    """
    groups = _attention_groups(model)
    if any("." in group for group in groups):
        raise ValueError(
            f"graph_edge_scores scores one residual stream (nodes blocks.L.attn.head.H and "
            f"blocks.L.mlp, as Circuit edges name them); this encoder-decoder has two, with the "
            f"attention kinds {groups}, which those names cannot tell apart. Use "
            "si.analysis.edge_scores(model, subnetwork, kind), which scores head-to-head "
            "composition per (source, reader) kind, e.g. encoder heads into "
            "decoder.cross_attn keys, and head_scores / neuron_scores for the units."
        )
    parallel = is_parallel_attn_mlp(model) if parallel_attn_mlp is None else bool(parallel_attn_mlp)
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
                # a parallel block's MLP reads the block's input, before its heads write
                yield [mlp_node(layer)], 2 * layer + (0 if parallel else 1), read[None]

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
    "is_parallel_attn_mlp",
    "top_heads",
]
