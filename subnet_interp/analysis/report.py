"""``html_report``: one self-contained HTML page about a subnetwork: its metadata and densities,
with the model its heads, neurons and a circuit graph, with data and a metric the ablation
against density-matched random controls. Everything is inline (SVG, a PNG data URI, the
script); the page fetches nothing and needs no matplotlib. ``subnet-interp report`` writes it
from the command line."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._ablations import Ablation
from .._subnetwork import Subnetwork
from . import _html
from ._html import escape
from ._report_charts import ablation_chart, faithfulness_chart
from .ablation import AblationReport, Metric, ablation_effect, loss
from .circuit_plot import plot_circuit
from .circuits import Circuit
from .components import graph_edge_scores, head_overlap, top_heads
from .faithfulness import FaithfulnessCurve
from .overlap import overlap
from .plots import head_densities, neuron_densities, per_layer_densities

_META_FIRST = ("method", "steps", "fingerprint", "created", "source")


def _table(rows: Iterable[tuple[Any, ...]], header: tuple[str, ...] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            text = f"{value:.4g}" if isinstance(value, float) else f"{value}"
            cells.append(
                f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _meta_section(subnetwork: Subnetwork, source: str | None) -> str:
    meta = dict(subnetwork.meta)
    rows: list[tuple[Any, ...]] = []
    if source:
        rows.append(("file", source))
    rows += [
        ("targets", str(len(subnetwork))),
        ("kept weights", f"{subnetwork.kept():,} of {subnetwork.numel():,}"),
        ("density", f"{subnetwork.density():.4g}"),
    ]
    for key in sorted(meta, key=lambda k: (k not in _META_FIRST, k)):
        value = meta[key]
        if isinstance(value, dict) and key == "hparams":
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "(defaults)"
        elif not isinstance(value, (str, int, float)):
            value = json.dumps(value, default=str)
        text = (
            value
            if isinstance(value, str)
            else f"{value:.4g}"
            if isinstance(value, float)
            else str(value)
        )
        rows.append((key, text if len(text) <= 300 else text[:300] + " ..."))
    return "<h2>Subnetwork</h2>" + _table(rows)


def _density_section(subnetwork: Subnetwork) -> str:
    parts = ["<h2>Densities</h2>"]
    layers, components, matrix = per_layer_densities(subnetwork)
    if layers:
        parts.append(
            _html.heatmap_svg(
                matrix,
                [str(layer) for layer in layers],
                components,
                title="kept fraction per layer and weight",
                column_axis="weight",
                cell=44,
            )
        )
    rows = [
        (name, "x".join(map(str, mask.shape)), int(mask.sum()), density)
        for (name, mask), density in zip(
            subnetwork.masks.items(), subnetwork.densities().values(), strict=True
        )
    ]
    table = _table(rows, ("target", "shape", "kept", "density"))
    parts.append(
        f"<details{' open' if not layers else ''}><summary>every target</summary>{table}</details>"
    )
    return "".join(parts)


def _unit_section(model: Any, subnetwork: Subnetwork) -> str:
    parts = ["<h2>Heads and neurons</h2>"]
    try:
        heads = head_densities(model, subnetwork)
    except ValueError as error:
        parts.append(_missing("head", "attn", subnetwork, error))
    else:
        for group, matrix in _by_group(heads):
            parts.append(
                _html.heatmap_svg(
                    matrix,
                    [str(i) for i in range(matrix.shape[0])],
                    [str(i) for i in range(matrix.shape[1])],
                    title=f"kept fraction of each {group}head's Q/K/V/O weights",
                    column_axis="head",
                )
            )
            best = ", ".join(
                f"{layer}.{head}: {score:.3f}" for layer, head, score in top_heads(matrix, 8)
            )
            parts.append(
                f'<p class="note">{escape(group)}heads most kept (layer.head: fraction): '
                f"{escape(best)}</p>"
            )
    try:
        neurons = neuron_densities(model, subnetwork)
    except ValueError as error:
        parts.append(_missing("neuron", "mlp", subnetwork, error))
    else:
        parts.extend(_neuron_image(matrix, group) for group, matrix in _by_group(neurons))
    return "".join(parts)


def _by_group(scores: Tensor | Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    """``(label, [layer, unit] scores)`` of each unit group: one unlabelled tensor, or an
    encoder-decoder's groups labelled ``"decoder.cross_attn "`` ... (see ``head_scores``)."""
    if isinstance(scores, Tensor):
        return [("", scores)]
    return [(f"{group} ", matrix) for group, matrix in scores.items()]


def _missing(unit: str, kind: str, subnetwork: Subnetwork, error: ValueError) -> str:
    """Why a view is left out: the subnetwork has no such weights, or the model no such axes."""
    if not any(f".{kind}." in name for name in subnetwork.names):
        why = f"the subnetwork covers no {'attention' if kind == 'attn' else 'MLP'} weights."
    else:
        why = str(error)
    return f'<p class="note">No {unit} view: {escape(why)}</p>'


def _neuron_image(neurons: Tensor, group: str = "") -> str:
    layers, width = neurons.shape
    scale_x = max(1, 900 // width)
    scale_y = max(4, min(24, 240 // layers))
    means = ", ".join(
        f"{layer}: {float(torch.nanmean(neurons[layer])):.3f}"
        if not bool(neurons[layer].isnan().all())
        else f"{layer}: -"
        for layer in range(layers)
    )
    info = f"kept fraction per MLP neuron; layer means {means}"
    return (
        f"<p><b>kept fraction of each {escape(group)}MLP neuron's weights</b> ({layers} layers "
        f"x {width} neurons; rows are layers from 0 at the top, colour as above, grey: not covered)</p>"
        f'<img class="pixelated si-neurons" alt="neuron densities" src="{_html.png_data_uri(neurons)}"'
        f' width="{width * scale_x}" height="{layers * scale_y}" data-info="{escape(info)}">'
        f'<p class="note">mean per layer: {escape(means)}</p>'
    )


def _comparison_section(model: Any | None, subnetwork: Subnetwork, other: Subnetwork) -> str:
    stats = overlap(subnetwork, other).total
    rows = [
        ("kept by this / the other", f"{stats.size_a:,} / {stats.size_b:,}"),
        ("shared", stats.intersection),
        ("IoU", stats.iou),
        ("Dice", stats.dice),
    ]
    parts = ["<h2>Compared with another subnetwork</h2>", _table(rows)]
    if model is not None:
        try:
            result = head_overlap(model, subnetwork, other)
        except ValueError as error:
            parts.append(f'<p class="note">No head view: {escape(error)}</p>')
        else:
            parts.append("<p>fraction of each head's Q/K/V/O weights that</p>")
            for title, value in (
                ("both keep", result.shared),
                ("only this one keeps", result.only_a),
                ("only the other keeps", result.only_b),
            ):
                for group, matrix in _by_group(value):
                    parts.append(
                        _html.heatmap_svg(
                            matrix,
                            [str(i) for i in range(matrix.shape[0])],
                            [str(i) for i in range(matrix.shape[1])],
                            title=f"{group}{title}",
                            column_axis="head",
                        )
                    )
    return "".join(parts)


def _graph_section(
    model: Any | None, subnetwork: Subnetwork, circuit: Circuit | None, top_k: int
) -> str:
    if circuit is not None:
        scored = [e for e in circuit.edges if e in circuit.edge_scores]
        keep = top_k if len(scored) > top_k and len(scored) == len(circuit.edges) else None
        plot = plot_circuit(
            circuit, top_k=keep, title="circuit" + (f" (top {keep} edges)" if keep else "")
        )
        note = "The circuit given with the report."
    else:
        try:
            scores = graph_edge_scores(model, subnetwork)
        except ValueError as error:
            return f'<h2>Circuit graph</h2><p class="note">No graph: {escape(error)}</p>'
        keep = min(top_k, len(scores))
        plot = plot_circuit(
            scores, top_k=keep, title=f"strongest {keep} edges of the masked weights"
        )
        note = (
            "Weight-based edge strengths of the masked model (si.analysis.graph_edge_scores: "
            "||W_s R_t|| / (||W_s|| ||R_t||) between what a source writes and a destination "
            f"input reads); the {keep} strongest."
        )
    return f'<h2>Circuit graph</h2><p class="note">{escape(note)}</p>{_html.CONTROLS}{plot.svg}'


def html_report(
    model: Any | None,
    subnetwork: Subnetwork,
    *,
    path: str | os.PathLike | None = None,
    data: Iterable[Any] | None = None,
    metric: Metric | Callable[[Any, Any], Tensor] | None = None,
    controls: int = 20,
    ablation: str | Ablation = "zero",
    circuit: Circuit | None = None,
    compare: Subnetwork | None = None,
    faithfulness: FaithfulnessCurve | None = None,
    ablation_report: AblationReport | None = None,
    top_k: int = 40,
    title: str | None = None,
    source: str | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """One self-contained HTML page about ``subnetwork`` (returned, and written to ``path``).

    Always: its metadata (method, hyper-parameters, fingerprint, ...), kept count and density,
    and a per layer x weight heatmap (every target in a table). With ``model`` (``None`` for
    none): per-head and per-neuron kept fractions (:func:`head_densities`,
    :func:`neuron_densities`) and a circuit graph of the strongest ``top_k`` edges of
    :func:`graph_edge_scores` on the masked weights (or of ``circuit``, when given, e.g. one read
    with ``Circuit.load``). With ``data`` (batches) and ``metric`` (a :class:`Metric`, or
    ``fn(model, batch) -> loss``, lower is better) as well: :func:`ablation_effect` with
    ``controls`` density-matched random controls under ``ablation``. ``compare``: another
    subnetwork of the same targets (overlap, and per head shared / only-one / only-other);
    ``faithfulness``: a :func:`faithfulness_curve` result to plot; ``ablation_report``: an
    :func:`ablation_effect` result already computed, shown instead of measuring again. ``source`` names the file
    the subnetwork came from. The page fetches nothing: open it anywhere, also offline.
    """
    if not isinstance(subnetwork, Subnetwork):
        raise TypeError(
            f"html_report(model, subnetwork, ...) needs a si.Subnetwork second, got "
            f"{type(subnetwork).__name__}; load one with si.Subnetwork.load(path)."
        )
    if (data is None) != (metric is None):
        raise ValueError(
            "The ablation section needs both data= (batches) and metric= (a si.analysis.Metric "
            "such as accuracy(...), or fn(model, batch) -> loss); pass both, or neither."
        )
    if data is not None and model is None:
        raise ValueError("data= and metric= measure the model: pass the model as well.")
    if data is not None and ablation_report is not None:
        raise ValueError(
            "Give data= and metric= (measure the ablation now) or ablation_report= (show one "
            "already measured), not both."
        )
    title = title or f"subnetwork report: {source or subnetwork.meta.get('method', 'subnetwork')}"
    sections = [f"<h1>{escape(title)}</h1>", _meta_section(subnetwork, source)]
    sections.append(_density_section(subnetwork))
    if model is not None:
        sections.append(_unit_section(model, subnetwork))
    if data is not None:
        measure = metric if isinstance(metric, Metric) else loss(metric)
        ablation_report = ablation_effect(
            model,
            subnetwork,
            measure,
            data,
            controls=controls,
            ablation=ablation,
            generator=generator,
        )
    if ablation_report is not None:
        report = ablation_report
        sections.append(
            "<h2>Ablation against random controls</h2>"
            f"<pre>{escape(str(report))}</pre>{ablation_chart(report)}"
        )
    if faithfulness is not None:
        sections.append(f"<h2>Faithfulness curve</h2>{faithfulness_chart(faithfulness)}")
    if compare is not None:
        sections.append(_comparison_section(model, subnetwork, compare))
    if circuit is not None or model is not None:
        sections.append(_graph_section(model, subnetwork, circuit, top_k))
    from .. import __version__

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections.append(f'<p class="note">subnet_interp {__version__}, {stamp}</p>')
    page = _html.page(title, "\n".join(sections))
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


__all__ = ["html_report"]
