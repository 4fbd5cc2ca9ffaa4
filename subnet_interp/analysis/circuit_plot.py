"""``plot_circuit``: a circuit (or scored edges) as a layered graph, embed at the bottom, each
layer's heads and then its MLP above it, unembed at the top; edges from a node's top to the
input they enter (a head's ``q`` / ``k`` / ``v`` port on its bottom edge). Static SVG and PNG,
and a self-contained interactive HTML page (zoom, pan, hover). No graphviz: the layout is the
model's own order, so it needs no graph-layout engine.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _html
from .circuits import EMBED, UNEMBED, Circuit, head_node, mlp_node, node_of, node_position

MAX_EDGES = 300
"""The most edge scores ``plot_circuit`` draws without ``top_k`` / ``threshold``."""
PORTS = {"q": -12.0, "k": 0.0, "v": 12.0}  # x offset of each head input on the node's bottom
DASHES = {"q": None, "k": "5,3", "v": "1.5,2.5"}
_HEAD_W, _MLP_W, _END_W, _NODE_H = 46.0, 62.0, 96.0, 24.0
_COLUMN, _ROW, _LEFT, _TOP = 58.0, 74.0, 78.0, 70.0
_FILL = {"embed": "#e0e0e0", "unembed": "#e0e0e0", "head": "#d6e6f5", "mlp": "#fde2c4"}


@dataclass(frozen=True)
class _Node:
    name: str
    label: str
    kind: str
    x: float
    y: float
    width: float
    in_circuit: bool
    score: float | None


@dataclass(frozen=True)
class CircuitPlot:
    """What :func:`plot_circuit` drew: the ``nodes`` (canonical names, those of the circuit
    first), the ``edges`` with their scores (``None`` for an unscored edge) and the ``svg``.

    ``html()`` gives a self-contained interactive page, ``save(path)`` writes ``.svg``, ``.html``
    or ``.png`` (matplotlib) by suffix, ``figure()`` draws it with matplotlib; in a notebook the
    plot shows itself as SVG.
    """

    nodes: tuple[str, ...]
    edges: Mapping[tuple[str, str], float | None]
    svg: str
    title: str
    _layout: tuple[_Node, ...] = field(repr=False, compare=False, default=())
    _size: tuple[float, float] = field(repr=False, compare=False, default=(0.0, 0.0))
    _labels: tuple[tuple[float, str], ...] = field(repr=False, compare=False, default=())

    def _repr_svg_(self) -> str:
        return self.svg

    def html(self) -> str:
        """A self-contained HTML page of the graph: inline SVG and script, nothing fetched;
        wheel zooms, dragging pans, hovering shows a node's or edge's name and score."""
        # alone on its page the graph takes the window's height
        fill = "<style>.si-graph { height: calc(100vh - 80px); }</style>"
        body = f"{fill}\n{_html.CONTROLS}\n{self.svg}"
        return _html.page(self.title, body)

    def save(self, path: str | os.PathLike) -> None:
        """Write the graph to ``path``: ``.svg``, ``.html`` (interactive) or ``.png``."""
        suffix = os.path.splitext(os.fspath(path))[1].lower()
        if suffix == ".png":
            self.figure().savefig(path, dpi=150)
            return
        if suffix not in (".svg", ".html", ".htm"):
            raise ValueError(
                f"plot_circuit writes .svg, .png or .html files, got {os.fspath(path)!r}; "
                "change the file's suffix."
            )
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.svg if suffix == ".svg" else self.html())

    def figure(self):
        """The graph as a ``matplotlib.figure.Figure`` (needs matplotlib)."""
        from ._circuit_figure import draw

        return draw(self)


def plot_circuit(
    circuit_or_edge_scores: Circuit | Mapping[tuple[str, str], float],
    *,
    path: str | os.PathLike | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    all_nodes: bool = False,
    title: str | None = None,
) -> CircuitPlot:
    """Draw a circuit as a layered graph: embed, per layer the heads and the MLP, unembed.

    Args:
        circuit_or_edge_scores: a :class:`Circuit` (its edges, scored by its ``edge_scores``
            where it has them; a circuit of nodes only is drawn as nodes, coloured by its
            ``node_scores`` if any), e.g. one read by ``Circuit.from_eap`` / ``from_acdc``;
            or edge scores ``{(source, destination): score}`` as
            :func:`~subnet_interp.analysis.graph_edge_scores` returns them.
        path: also write the graph there: ``.svg``, ``.png`` (needs matplotlib) or ``.html``
            (self-contained interactive page: zoom, pan, hover for names and scores).
        top_k: draw only the ``top_k`` edges of largest ``|score|`` (as EAP-IG's ``topn``
            ranks them; equal scores keep the given order).
        threshold: draw only edges with ``|score| >= threshold``. With ``top_k`` or
            ``threshold`` only scored edges are candidates; ``nan`` scores are never drawn.
        all_nodes: also draw, outlined, every node of the model outside the circuit (the shape
            comes from the circuit's ``n_layers`` / ``n_heads`` or the largest names drawn).
        title: the figure's title.

    Edge colour and width follow the score (yellow to dark red by score, or blue for negative
    and red for positive scores when any is negative; grey when unscored). An edge into a head
    ends at the input it feeds: ``q`` left (solid), ``k`` middle (dashed), ``v`` right
    (dotted); an edge without a port ends at the head's middle. Edge scores of more than
    ``MAX_EDGES`` edges need ``top_k`` or ``threshold``.
    """
    edges, circuit_nodes, node_scores, shape = _select(circuit_or_edge_scores, top_k, threshold)
    if title is None:
        kept = (
            f"{len(edges)} edges" if edges or not circuit_nodes else f"{len(circuit_nodes)} nodes"
        )
        title = f"circuit: {kept}" + (f", top {top_k} by |score|" if top_k is not None else "")
    layout, size, labels = _layout(edges, circuit_nodes, node_scores, shape if all_nodes else None)
    svg = _svg(layout, edges, size, labels, title)
    order = sorted(layout, key=lambda n: (not n.in_circuit, _rank(n)))
    plot = CircuitPlot(
        tuple(n.name for n in order), edges, svg, title, tuple(layout), size, tuple(labels)
    )
    if path is not None:
        plot.save(path)
    return plot


def _select(source: Any, top_k: int | None, threshold: float | None):
    if top_k is not None and threshold is not None:
        raise ValueError(
            f"Give at most one of top_k= and threshold=; got top_k={top_k!r}, "
            f"threshold={threshold!r}."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
    ):
        raise ValueError(f"threshold must be a number, got {threshold!r}.")
    if isinstance(source, Circuit):
        circuit = source
        candidates = {e: circuit.edge_scores.get(e) for e in sorted(circuit.edges)}
        nodes = set(circuit.nodes)
    elif isinstance(source, Mapping):
        if not source:
            raise ValueError(
                "No edge scores given (e.g. si.analysis.graph_edge_scores(model, sub))."
            )
        bad = [k for k in source if not (isinstance(k, tuple) and len(k) == 2)]
        if bad:
            raise ValueError(
                f"Edge scores are keyed by (source, destination) name pairs, got key {bad[0]!r}; "
                "see si.analysis.graph_edge_scores or Circuit.edge_scores."
            )
        circuit = Circuit(frozenset(), frozenset(), dict(source))  # checks every name
        candidates = dict(circuit.edge_scores)
        nodes = set()
        if top_k is None and threshold is None and len(candidates) > MAX_EDGES:
            raise ValueError(
                f"{len(candidates)} scored edges are too many to read in one picture; pass "
                f"top_k= (e.g. top_k=50) or threshold= to draw the strongest."
            )
    else:
        raise TypeError(
            "plot_circuit draws a si.analysis.Circuit or a dict of edge scores "
            f"{{(source, destination): score}}, got {type(source).__name__}. Read other tools' "
            "files with Circuit.from_eap / from_acdc / from_auto_circuit."
        )
    if top_k is not None or threshold is not None:
        scored = [(e, s) for e, s in candidates.items() if s is not None and not math.isnan(s)]
        if not scored:
            raise ValueError(
                "top_k= / threshold= rank edges by score, but none of the circuit's "
                f"{len(candidates)} edges has a score; leave both out to draw every edge."
            )
        if threshold is not None:
            kept = [(e, s) for e, s in scored if abs(s) >= threshold]
        else:
            if top_k > len(scored):
                raise ValueError(
                    f"top_k={top_k} but only {len(scored)} edges have a score; pass "
                    f"top_k <= {len(scored)}."
                )
            kept = sorted(scored, key=lambda item: -abs(item[1]))[:top_k]
        edges: dict[tuple[str, str], float | None] = dict(kept)
    elif isinstance(source, Circuit):  # every edge is drawn, one with a nan score as unscored
        edges = {e: (None if s is None or math.isnan(s) else s) for e, s in candidates.items()}
    else:  # edge scores: a nan score is no edge
        edges = {e: s for e, s in candidates.items() if not math.isnan(s)}
    node_scores = dict(circuit.node_scores)
    names = {node_of(x) for e in candidates for x in e} | set(circuit.node_scores) | nodes
    positions = [p for p in map(node_position, names) if p is not None]
    n_layers = circuit.n_layers or (1 + max((p[0] for p in positions), default=-1))
    heads = [p[1] for p in positions if p[1] is not None]
    n_heads = circuit.n_heads or (1 + max(heads, default=-1))
    return edges, nodes, node_scores, (n_layers, n_heads)


def _rank(node: _Node) -> tuple[int, int, int]:
    position = node_position(node.name)
    if position is None:
        return (0 if node.name == EMBED else 2, 0, 0)
    layer, head = position
    return (1, layer, head if head is not None else 1 << 30)


def _layout(edges, circuit_nodes, node_scores, shape):
    """Node positions: a row per layer's heads and one per layer's MLP, bottom to top."""
    drawn = set(circuit_nodes) | {node_of(x) for e in edges for x in e}
    context = set()
    if shape is not None:
        n_layers, n_heads = shape
        every = {EMBED, UNEMBED} | {mlp_node(layer) for layer in range(n_layers)}
        every |= {head_node(layer, h) for layer in range(n_layers) for h in range(n_heads)}
        context = every - drawn
    names = drawn | context
    positions = {n: node_position(n) for n in names}
    columns = sorted({p[1] for p in positions.values() if p is not None and p[1] is not None})
    rows: list[tuple[int, str]] = []
    for layer in sorted({p[0] for p in positions.values() if p is not None}):
        for kind in ("head", "mlp"):
            if any(
                p is not None and p[0] == layer and (p[1] is None) == (kind == "mlp")
                for p in positions.values()
            ):
                rows.append((layer, kind))
    first = 1 if EMBED in names else 0  # embed and unembed take a row only when drawn
    levels = max(1, first + len(rows) + (UNEMBED in names))
    mlp_x = _LEFT + _COLUMN * len(columns) + _MLP_W / 2 + 10
    width = max(mlp_x + _MLP_W / 2 + 30, 520.0)  # at least the legend's width
    centre = (_LEFT + mlp_x) / 2 if columns else mlp_x
    height = _TOP + _ROW * (levels - 1) + _NODE_H + 20
    y_of = lambda level: _TOP + _ROW * (levels - 1 - level) + _NODE_H / 2  # noqa: E731
    layout = []
    for name in sorted(names, key=lambda n: (n != EMBED, n == UNEMBED, str(positions[n]))):
        position = positions[name]
        if position is None:
            level = 0 if name == EMBED else levels - 1
            x, kind, w, label = centre, name, _END_W, name if name == EMBED else "unembed (logits)"
        else:
            layer, head = position
            kind = "mlp" if head is None else "head"
            level = first + rows.index((layer, kind))
            if head is None:
                x, w, label = mlp_x, _MLP_W, f"mlp {layer}"
            else:
                x, w, label = (
                    _LEFT + _COLUMN * (columns.index(head) + 0.5),
                    _HEAD_W,
                    f"a{layer}.h{head}",
                )
        layout.append(
            _Node(name, label, kind, x, y_of(level), w, name in drawn, node_scores.get(name))
        )
    layout.sort(key=_rank)
    labels = []
    for layer, kind in rows:
        if kind == "head" or (layer, "head") not in rows:
            labels.append((y_of(first + rows.index((layer, kind))), f"layer {layer}"))
    return layout, (width, height), labels


def _endpoints(
    where: Mapping[str, _Node], edge: tuple[str, str]
) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)``: the source's top and the destination's input (port) in SVG space
    (``where``: the layout's nodes by name)."""
    src, dst = where[edge[0]], where[node_of(edge[1])]
    port = edge[1][-1] if node_of(edge[1]) != edge[1] else None
    x1 = dst.x + (PORTS[port] if port else 0.0)
    return src.x, src.y - _NODE_H / 2, x1, dst.y + _NODE_H / 2 + (3.0 if port else 0.0)


def _edge_style(edges) -> tuple[str, float]:
    """The colour scale of these edges' scores (``diverging`` if any is negative) and the
    largest ``|score|``."""
    values = [s for s in edges.values() if s is not None]
    scale = "diverging" if any(v < 0 for v in values) else "edges"
    return scale, max((abs(v) for v in values), default=0.0)


def _edge_look(score: float | None, scale: str, largest: float) -> tuple[str, float]:
    """Colour and width of an edge."""
    if score is None:
        return "#888888", 1.2
    fraction = abs(score) / largest if largest > 0 else 1.0
    low = -largest if scale == "diverging" else 0.0
    return _html.colour(score, low, largest, scale=scale), 0.8 + 4.2 * fraction


def _node_fill(node: _Node, node_range: tuple[float, float, str] | None) -> str:
    """A node's fill: white outside the circuit, else by its score, else by its kind."""
    if not node.in_circuit:
        return "#ffffff"
    if node.score is not None and node_range is not None:
        low, high, scale = node_range
        return _html.colour(node.score, low, high, scale=scale)
    return _FILL[node.kind]


def _node_range(layout) -> tuple[float, float, str] | None:
    """The node scores' colour range and scale (diverging around 0 when any is negative)."""
    scores = [n.score for n in layout if n.score is not None and not math.isnan(n.score)]
    if not scores:
        return None
    if min(scores) < 0:
        largest = max(abs(v) for v in scores)
        return -largest, largest, "diverging"
    return min(scores), max(scores), "sequential"


def _svg(layout, edges, size, labels, title) -> str:
    width, height = size
    scale, largest = _edge_style(edges)
    e = _html.escape
    parts = [
        f'<svg class="si-graph si-zoom" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        'font-family="sans-serif" font-size="10">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{e(title)}</text>',
    ]
    legend_x = 10.0
    if largest > 0:
        low = -largest if scale == "diverging" else 0.0
        parts.append(f'<text x="{legend_x}" y="45">edge score</text>')
        parts.append(_html.colour_bar(legend_x + 110, 36.0, low, largest, "edges", scale))
        legend_x += 290
    for i, (port, dash) in enumerate(DASHES.items()):
        x = legend_x + 62 * i
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{x}" y1="41" x2="{x + 28}" y2="41" stroke="#555" stroke-width="2"'
            f'{dash_attr}/><text x="{x + 32}" y="45">{port}</text>'
        )
    for y, text in labels:
        parts.append(f'<text x="8" y="{y + 4:.1f}" fill="#777">{text}</text>')
    order = sorted(edges, key=lambda k: -1.0 if edges[k] is None else abs(edges[k]))
    where = {n.name: n for n in layout}
    for edge in order:
        score = edges[edge]
        x0, y0, x1, y1 = _endpoints(where, edge)
        colour, stroke = _edge_look(score, scale, largest)
        bend = max(18.0, (y0 - y1) / 2)
        port = edge[1][-1] if node_of(edge[1]) != edge[1] else None
        dash = f' stroke-dasharray="{DASHES[port]}"' if port and DASHES[port] else ""
        shown = "unscored" if score is None else f"{score:.4g}"
        info = f"{edge[0]} -> {edge[1]}\nscore {shown}"
        parts.append(
            f'<path class="edge" d="M{x0:.1f},{y0:.1f} C{x0:.1f},{y0 - bend:.1f} '
            f'{x1:.1f},{y1 + bend:.1f} {x1:.1f},{y1:.1f}" fill="none" stroke="{colour}" '
            f'stroke-width="{stroke:.2f}" stroke-opacity="0.85"{dash} data-src="{e(edge[0])}" '
            f'data-dst="{e(edge[1])}" data-node="{e(node_of(edge[1]))}" data-score="{shown}" '
            f'data-info="{e(info)}"><title>{e(info)}</title></path>'
        )
    scores_range = _node_range(layout)
    for node in layout:
        score = "" if node.score is None else f"\nscore {node.score:.4g}"
        where = "" if node.in_circuit else "\n(not in the circuit)"
        info = f"{node.name}{score}{where}"
        border = "#444" if node.in_circuit else "#bbb"
        dash = "" if node.in_circuit else ' stroke-dasharray="3,2"'
        x, y, w = node.x - node.width / 2, node.y - _NODE_H / 2, node.width
        parts.append(
            f'<g class="node" data-name="{e(node.name)}" data-in-circuit="{int(node.in_circuit)}"'
            f' data-info="{e(info)}"><title>{e(info)}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.0f}" height="{_NODE_H:.0f}" rx="4" '
            f'fill="{_node_fill(node, scores_range)}" stroke="{border}"{dash}/>'
            f'<text x="{node.x:.1f}" y="{node.y + 3:.1f}" text-anchor="middle" '
            f'fill="{"#222" if node.in_circuit else "#aaa"}">{e(node.label)}</text>'
        )
        if node.kind == "head" and node.in_circuit:
            for port, dx in PORTS.items():
                parts.append(
                    f'<circle cx="{node.x + dx:.1f}" cy="{node.y + _NODE_H / 2:.1f}" r="3" '
                    f'fill="#fff" stroke="#444"><title>{e(node.name)}.{port}</title></circle>'
                )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["MAX_EDGES", "CircuitPlot", "plot_circuit"]
