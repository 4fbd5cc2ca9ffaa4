"""``Circuit.from_edge_scores``: the strongest scored edges as a circuit (see its docstring)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

from .._types import NotFoundError
from .circuits import EMBED, UNEMBED, Circuit, node_of, node_position

KINDS = (
    "head->q",
    "head->k",
    "head->v",
    "head->mlp",
    "mlp->q",
    "mlp->k",
    "mlp->v",
    "mlp->mlp",
)


def edge_kind(edge: tuple[str, str]) -> str:
    """An edge's kind, ``"<source>-><input>"``: source ``embed``, ``head`` or ``mlp``; input
    ``q``, ``k``, ``v`` (a head's port), ``head`` (a head without port), ``mlp`` or ``unembed``.
    ``graph_edge_scores`` gives the eight kinds of :data:`KINDS`."""
    src, dst = edge
    position = node_position(src)
    source = EMBED if position is None else ("mlp" if position[1] is None else "head")
    if dst == UNEMBED:
        return f"{source}->unembed"
    position = node_position(dst)
    if position is None or position[1] is None:
        return f"{source}->mlp"
    return f"{source}->{dst[-1] if node_of(dst) != dst else 'head'}"


def from_edge_scores(
    scores: Mapping[tuple[str, str], float],
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    per_kind: bool = False,
    kinds: Iterable[str] | None = None,
    connect: bool = True,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> Circuit:
    if (top_k is None) == (threshold is None):
        raise ValueError(
            f"Give exactly one of top_k= (keep that many edges) or threshold= (keep edges "
            f"scoring at least that much); got top_k={top_k!r}, threshold={threshold!r}."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or math.isnan(float(threshold))
    ):
        raise ValueError(
            f"threshold must be a number, got {threshold!r}. Pass a float score, e.g. threshold=0.2."
        )
    if per_kind and top_k is None:
        raise ValueError(
            "per_kind=True keeps the top_k edges of each kind; it takes top_k=, not threshold= "
            "(a threshold is one number for every kind: use per_kind=False)."
        )
    if not scores:
        raise ValueError("No edge scores given (e.g. si.analysis.graph_edge_scores(model, sub)).")
    items = [((str(s), str(d)), float(v)) for (s, d), v in scores.items()]
    known = {edge_kind(e) for e, _ in items}  # also checks every name
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = sorted(set(kinds) - known)
        if unknown:
            raise ValueError(
                f"kinds {unknown} are not among the scored edges' kinds {sorted(known)} "
                "(see si.analysis.edge_kind)."
            )
        items = [(e, v) for e, v in items if edge_kind(e) in kinds]
    items = [(e, v) for e, v in items if not math.isnan(v)]
    if threshold is not None:
        kept = [(e, v) for e, v in items if v >= threshold]
    else:
        groups: dict[str, list] = {}
        for e, v in items:
            groups.setdefault(edge_kind(e) if per_kind else "", []).append((e, v))
        kept = []
        for kind, group in groups.items():
            if top_k > len(group):
                what = f"edges of kind {kind!r}" if per_kind else "scored edges (nan dropped)"
                raise ValueError(
                    f"top_k={top_k} but there are only {len(group)} {what}{_filtered(kinds)}; "
                    f"pass top_k <= {len(group)}, or threshold= instead."
                )
            # sorted() is stable: equal scores keep the order of the given dict
            kept += sorted(group, key=lambda item: -item[1])[:top_k]
    edges = {e: v for e, v in kept}
    if n_layers is None or n_heads is None:
        positions = [node_position(x) for e in scores for x in e]
        positions = [p for p in positions if p is not None]
        if n_layers is None and positions:
            n_layers = 1 + max(layer for layer, _ in positions)
        heads = [h for _, h in positions if h is not None]
        if n_heads is None and heads:
            n_heads = 1 + max(heads)
    outside = sorted(
        {
            node_of(x)
            for e in scores
            for x in e
            if (p := node_position(x)) is not None
            and (p[0] >= (n_layers or math.inf) or (p[1] or 0) >= (n_heads or math.inf))
        }
    )
    if outside:
        raise NotFoundError(
            f"Scored nodes {outside[:5]} do not exist in a model with n_layers={n_layers}, "
            f"n_heads={n_heads}; pass the model's shape, or leave them out to infer it."
        )
    links = set(edges)
    if connect:
        links |= _connections(edges, ported=any(node_of(d) != d for _, d in scores))
    return Circuit(frozenset(), frozenset(links), edges, n_layers=n_layers, n_heads=n_heads)


def _filtered(kinds) -> str:
    return "" if kinds is None else f" of kinds {kinds}"


def _connections(edges: Iterable[tuple[str, str]], *, ported: bool) -> set[tuple[str, str]]:
    """``embed -> node`` for every node with no incoming edge (into each of a head's q/k/v when
    the edges carry ports) and ``node -> unembed`` for every node with no outgoing edge."""
    nodes = {node_of(x) for e in edges for x in e} - {EMBED, UNEMBED}
    fed = {node_of(d) for _, d in edges}
    feeding = {s for s, _ in edges}
    out = set()
    for node in sorted(nodes):
        if node not in fed:
            is_head = node_position(node)[1] is not None
            ports = [f"{node}.{p}" for p in "qkv"] if is_head and ported else [node]
            out |= {(EMBED, port) for port in ports}
        if node not in feeding:
            out.add((node, UNEMBED))
    return out


__all__ = ["KINDS", "edge_kind", "from_edge_scores"]
