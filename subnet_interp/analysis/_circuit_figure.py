"""``CircuitPlot.figure``: the layered circuit graph drawn with matplotlib (for PNG output)."""

from __future__ import annotations

from . import _html
from .circuit_plot import (
    _NODE_H,
    DASHES,
    PORTS,
    CircuitPlot,
    _edge_look,
    _edge_style,
    _endpoints,
    _node_fill,
    _node_range,
)
from .circuits import node_of
from .plots import _pyplot

_MPL_DASHES = {"q": "-", "k": (0, (5, 3)), "v": (0, (1.5, 2.5))}


def draw(plot: CircuitPlot):
    """The figure of ``plot``: the same layout, colours and widths as its SVG (1 px = 0.01 in)."""
    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path

    width, height = plot._size
    fig = plt.figure(figsize=(width / 100, height / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # SVG coordinates: y grows downwards
    ax.axis("off")
    ax.text(10, 20, plot.title, fontsize=11, fontweight="bold", va="baseline")
    scale, largest = _edge_style(plot.edges)
    legend_x = 10.0
    if largest > 0:  # the edge colour bar, as in the SVG
        import numpy as np
        from matplotlib.colors import LinearSegmentedColormap

        stops = [tuple(c / 255 for c in rgb) for rgb in _html.SCALES[scale]]
        cmap = LinearSegmentedColormap.from_list(scale, stops)
        low = -largest if scale == "diverging" else 0.0
        ax.text(legend_x, 45, "edge score", fontsize=8)
        ax.imshow(np.linspace(0, 1, 64)[None], cmap=cmap, extent=(120, 240, 46, 36), aspect="auto")
        ax.text(116, 45, f"{low:.3g}", fontsize=7, ha="right")
        ax.text(244, 45, f"{largest:.3g}", fontsize=7)
        legend_x += 290
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # imshow resets the limits
    for i, port in enumerate(DASHES):
        x = legend_x + 62 * i
        ax.plot([x, x + 28], [41, 41], color="#555", linewidth=1.5, linestyle=_MPL_DASHES[port])
        ax.text(x + 32, 45, port, fontsize=8)
    for y, text in plot._labels:
        ax.text(8, y + 4, text, fontsize=8, color="#777")
    order = sorted(plot.edges, key=lambda k: -1.0 if plot.edges[k] is None else abs(plot.edges[k]))
    where = {n.name: n for n in plot._layout}
    for edge in order:
        x0, y0, x1, y1 = _endpoints(where, edge)
        colour, stroke = _edge_look(plot.edges[edge], scale, largest)
        bend = max(18.0, (y0 - y1) / 2)
        port = edge[1][-1] if node_of(edge[1]) != edge[1] else "q"
        path = Path(
            [(x0, y0), (x0, y0 - bend), (x1, y1 + bend), (x1, y1)],
            [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4],
        )
        ax.add_patch(
            PathPatch(
                path,
                fill=False,
                edgecolor=colour,
                linewidth=stroke * 0.72,  # px to points
                alpha=0.85,
                linestyle=_MPL_DASHES[port],
            )
        )
    scores = _node_range(plot._layout)
    for node in plot._layout:
        ax.add_patch(
            FancyBboxPatch(
                (node.x - node.width / 2, node.y - _NODE_H / 2),
                node.width,
                _NODE_H,
                boxstyle="round,pad=0,rounding_size=4",
                facecolor=_node_fill(node, scores),
                edgecolor="#444" if node.in_circuit else "#bbb",
                linestyle="-" if node.in_circuit else "--",
                zorder=3,
            )
        )
        ax.text(
            node.x,
            node.y + 3,
            node.label,
            ha="center",
            fontsize=7,
            color="#222" if node.in_circuit else "#aaa",
            zorder=4,
        )
        if node.kind == "head" and node.in_circuit:
            for dx in PORTS.values():
                ax.add_patch(
                    plt.Circle(
                        (node.x + dx, node.y + _NODE_H / 2), 3, fc="white", ec="#444", zorder=4
                    )
                )
    return fig
