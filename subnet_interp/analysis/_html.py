"""Self-contained HTML and SVG pieces (no network, no matplotlib): colour scales, an SVG heatmap,
a PNG encoder for large heatmaps, and the page template whose inline script gives every
``svg.si-zoom`` zoom / pan and every ``[data-info]`` element a hover tooltip."""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

# viridis at five stops (sequential scores) and a blue-grey-red diverging scale (signed scores)
_SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_DIVERGING = ((33, 102, 172), (146, 197, 222), (200, 200, 200), (244, 165, 130), (178, 24, 43))
# yellow-orange-red without its near-white end: the strongest edges are the darkest on white
_EDGES = ((254, 204, 92), (253, 141, 60), (227, 26, 28), (128, 0, 38))
SCALES = {"sequential": _SEQUENTIAL, "diverging": _DIVERGING, "edges": _EDGES}
MISSING = "#eeeeee"


def escape(text: object) -> str:
    """``text`` escaped for HTML / SVG text and attribute values."""
    return html.escape(str(text), quote=True)


def _interpolate(stops: Sequence[tuple[int, int, int]], t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    a, b = stops[i], stops[i + 1]
    return tuple(round(a[c] + f * (b[c] - a[c])) for c in range(3))  # type: ignore[return-value]


def colour(value: float, vmin: float, vmax: float, *, scale: str = "sequential") -> str:
    """``#rrggbb`` of ``value`` from ``vmin`` to ``vmax`` on a scale of :data:`SCALES`
    (``sequential``: viridis; ``diverging``: blue-grey-red; ``edges``: yellow-orange-red);
    ``nan`` is light grey."""
    if value is None or math.isnan(value):
        return MISSING
    t = 0.5 if vmax == vmin else (value - vmin) / (vmax - vmin)
    r, g, b = _interpolate(SCALES[scale], t)
    return f"#{r:02x}{g:02x}{b:02x}"


def gradient_stops(scale: str = "sequential") -> str:
    """``<stop>`` elements of a scale, for an SVG ``linearGradient`` colour bar."""
    stops = SCALES[scale]
    return "".join(
        f'<stop offset="{i / (len(stops) - 1):.2f}" stop-color="#{r:02x}{g:02x}{b:02x}"/>'
        for i, (r, g, b) in enumerate(stops)
    )


def heatmap_svg(
    matrix: Tensor,
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    row_axis: str = "layer",
    column_axis: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cell: int = 26,
) -> str:
    """An SVG heatmap of a ``[rows, columns]`` matrix, one ``rect`` per cell with a
    ``data-info`` tooltip (row, column, value), ``nan`` cells light grey."""
    values = matrix.detach().double().cpu().tolist()
    left, top = 70, 34
    rotate = max((len(str(c)) for c in columns), default=0) * 6.5 > cell
    under = 6.0 * max((len(str(c)) for c in columns), default=0) if rotate else 16.0
    width = max(left + cell * len(columns) + 20, left + 7.5 * len(title), left + 250)
    height = top + cell * len(rows) + under + 50
    parts = [
        f'<svg class="si-heatmap" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<text x="8" y="{top + cell * len(rows) / 2}" fill="#555">{escape(row_axis)}</text>',
    ]
    for i, row in enumerate(rows):
        y = top + i * cell
        parts.append(
            f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">{escape(row)}</text>'
        )
        for j, column in enumerate(columns):
            value = values[i][j]
            shown = "not covered" if math.isnan(value) else f"{value:.3f}"
            info = f"{row_axis} {row}, {column_axis} {column}: {shown}".replace("  ", " ")
            parts.append(
                f'<rect class="cell" x="{left + j * cell}" y="{y}" width="{cell - 1}" '
                f'height="{cell - 1}" fill="{colour(value, vmin, vmax)}" '
                f'data-info="{escape(info)}"><title>{escape(info)}</title></rect>'
            )
    bottom = top + cell * len(rows)
    step = max(1, len(columns) // 24)
    for j in range(0, len(columns), step):
        x, y = left + j * cell + cell / 2, bottom + 14
        turn = f'transform="rotate(-40 {x} {y})" text-anchor="end"' if rotate else ""
        anchor = turn or 'text-anchor="middle"'
        parts.append(f'<text x="{x}" y="{y}" {anchor}>{escape(columns[j])}</text>')
    legend = bottom + under + 14
    parts.append(
        f'<text x="{left}" y="{legend + 8}" fill="#555">{escape(column_axis)}</text>'
        + colour_bar(left + 80, legend, vmin, vmax, _key(title))
        + "</svg>"
    )
    return "".join(parts)


def colour_bar(
    x: float | int, y: float | int, vmin: float, vmax: float, key: str, scale: str = "sequential"
) -> str:
    """An SVG colour bar of ``scale`` at ``(x, y)``, 120 wide, labelled ``vmin`` / ``vmax``
    (``key`` keeps its gradient's id unique within a page)."""
    return (
        f'<defs><linearGradient id="si-grad-{key}">{gradient_stops(scale)}</linearGradient>'
        f'</defs><rect x="{x}" y="{y}" width="120" height="10" fill="url(#si-grad-{key})"/>'
        f'<text x="{x - 4}" y="{y + 9}" text-anchor="end">{vmin:.3g}</text>'
        f'<text x="{x + 124}" y="{y + 9}">{vmax:.3g}</text>'
    )


def _key(text: str) -> str:
    return zlib.crc32(text.encode()).to_bytes(4, "big").hex()


def png_data_uri(matrix: Tensor, *, vmin: float = 0.0, vmax: float = 1.0) -> str:
    """A ``[rows, columns]`` matrix as a ``data:image/png;base64,...`` URI on the sequential
    scale, one pixel per cell (``nan`` light grey): for heatmaps too large for one SVG element per
    cell, e.g. every MLP neuron. Vectorised; needs neither matplotlib nor PIL."""
    values = matrix.detach().double().cpu()
    stops = torch.tensor(_SEQUENTIAL, dtype=torch.float64)
    t = ((values - vmin) / (vmax - vmin if vmax != vmin else 1.0)).clamp(0, 1) * (len(stops) - 1)
    index = t.floor().clamp(max=len(stops) - 2).long()
    frac = (t - index)[..., None]
    rgb = stops[index] + frac * (stops[index + 1] - stops[index])
    rgb[values.isnan()] = torch.tensor([238.0, 238.0, 238.0], dtype=torch.float64)
    pixels = rgb.round().to(torch.uint8)
    height, width = pixels.shape[:2]
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.flatten(1)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 9))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.si-graph { border: 1px solid #ddd; width: 100%; height: 640px; cursor: grab; display: block; }
.si-tip { position: fixed; display: none; pointer-events: none; background: #222; color: #fff;
  font-size: 12px; padding: 4px 8px; border-radius: 4px; z-index: 10; white-space: pre; }
.si-controls button { margin-right: 4px; }
.si-graph .edge.dim, .si-graph .node.dim { opacity: 0.12; }
.si-graph .edge.hot { stroke: #000 !important; }
.note { color: #666; font-size: 13px; }
img.pixelated { image-rendering: pixelated; border: 1px solid #ddd; }
"""

# Every svg.si-zoom gets wheel zoom, drag pan, double-click reset and the +/-/reset buttons of
# its .si-controls; every [data-info] element shows its text in the tooltip; hovering a circuit
# node highlights its edges. Ends by marking <body data-si-ready="1"> (the tests look for it).
SCRIPT = """
(function () {
  var tip = document.createElement('div');
  tip.className = 'si-tip';
  document.body.appendChild(tip);
  function place(event) {
    tip.style.left = (event.clientX + 14) + 'px';
    tip.style.top = (event.clientY + 14) + 'px';
  }
  document.addEventListener('mouseover', function (event) {
    var target = event.target.closest ? event.target.closest('[data-info]') : null;
    if (!target) { tip.style.display = 'none'; return; }
    tip.textContent = target.getAttribute('data-info');
    tip.style.display = 'block';
    place(event);
    var graph = target.closest('svg.si-graph');
    if (graph && target.classList.contains('node')) {
      var name = target.getAttribute('data-name');
      graph.querySelectorAll('.edge').forEach(function (edge) {
        var touches = edge.getAttribute('data-src') === name ||
          edge.getAttribute('data-node') === name;
        edge.classList.toggle('dim', !touches);
      });
    }
  });
  document.addEventListener('mousemove', function (event) {
    if (tip.style.display === 'block') { place(event); }
  });
  document.addEventListener('mouseout', function (event) {
    var target = event.target.closest ? event.target.closest('.node') : null;
    if (!target) { return; }
    var graph = target.closest('svg.si-graph');
    if (graph) {
      graph.querySelectorAll('.edge.dim').forEach(function (e) { e.classList.remove('dim'); });
    }
  });
  document.querySelectorAll('svg.si-zoom').forEach(function (svg) {
    var box = svg.getAttribute('viewBox').split(/\\s+/).map(Number);
    var initial = box.slice();
    function apply() { svg.setAttribute('viewBox', box.join(' ')); }
    function zoom(factor, cx, cy) {
      box[0] = cx - (cx - box[0]) * factor;
      box[1] = cy - (cy - box[1]) * factor;
      box[2] *= factor;
      box[3] *= factor;
      apply();
    }
    function toUser(event) {
      var rect = svg.getBoundingClientRect();
      var scale = Math.max(box[2] / rect.width, box[3] / rect.height);
      return [box[0] + (event.clientX - rect.left) * scale,
              box[1] + (event.clientY - rect.top) * scale, scale];
    }
    svg.addEventListener('wheel', function (event) {
      event.preventDefault();
      var p = toUser(event);
      zoom(event.deltaY > 0 ? 1.15 : 1 / 1.15, p[0], p[1]);
    }, { passive: false });
    var drag = null;
    svg.addEventListener('mousedown', function (event) {
      drag = [event.clientX, event.clientY, toUser(event)[2]];
      svg.style.cursor = 'grabbing';
    });
    window.addEventListener('mousemove', function (event) {
      if (!drag) { return; }
      box[0] -= (event.clientX - drag[0]) * drag[2];
      box[1] -= (event.clientY - drag[1]) * drag[2];
      drag[0] = event.clientX;
      drag[1] = event.clientY;
      apply();
    });
    window.addEventListener('mouseup', function () { drag = null; svg.style.cursor = 'grab'; });
    svg.addEventListener('dblclick', function () { box = initial.slice(); apply(); });
    var controls = svg.previousElementSibling;
    if (controls && controls.classList.contains('si-controls')) {
      controls.querySelectorAll('button').forEach(function (button) {
        button.addEventListener('click', function () {
          var action = button.getAttribute('data-action');
          var cx = box[0] + box[2] / 2, cy = box[1] + box[3] / 2;
          if (action === 'in') { zoom(1 / 1.3, cx, cy); }
          else if (action === 'out') { zoom(1.3, cx, cy); }
          else { box = initial.slice(); apply(); }
        });
      });
    }
  });
  document.body.setAttribute('data-si-ready', '1');
})();
"""

CONTROLS = (
    '<div class="si-controls"><button data-action="in">+</button>'
    '<button data-action="out">&minus;</button><button data-action="reset">reset</button>'
    '<span class="note"> wheel: zoom, drag: pan, double-click: reset, hover: names and '
    "scores</span></div>"
)


def page(title: str, body: str) -> str:
    """A complete self-contained HTML page: inline style and script, nothing fetched."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title>"
        # no favicon request either: the page must open with no network and no console errors
        '<link rel="icon" href="data:,">'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n"
        "</body></html>\n"
    )


__all__ = ["colour", "colour_bar", "escape", "heatmap_svg", "page", "png_data_uri"]
