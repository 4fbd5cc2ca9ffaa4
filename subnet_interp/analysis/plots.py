"""Figures (the ``[plots]`` extra, matplotlib): densities, overlaps, ablation reports.

Each function returns a ``matplotlib.figure.Figure`` and, given ``path``, also saves a PNG.
Functions that take a model take ``(model, subnetwork, ...)``; the old order
``(subnetwork, model, ...)`` still works, with a ``FutureWarning``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._subnetwork import Subnetwork
from .._types import block_position
from ._order import model_then_subnetwork
from .ablation import AblationReport
from .components import head_overlap, head_scores, neuron_scores
from .faithfulness import FaithfulnessCurve
from .overlap import overlap_matrix


def _pyplot():
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in (
            "agg",
            "module://matplotlib_inline.backend_inline",
        ):
            import os

            if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
                matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plots need matplotlib: pip install 'subnet_interp[plots]'.") from error
    return plt


def _finish(fig, path: str | None):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def per_layer_densities(subnetwork: Subnetwork) -> tuple[list[int], list[str], torch.Tensor]:
    """Densities of canonical ``blocks.{L}.{component}`` targets as a ``[layers, components]``
    matrix (``nan`` where a layer lacks a component)."""
    cells: dict[tuple[int, str], float] = {}
    for name, density in subnetwork.densities().items():
        position = block_position(name)
        if position is not None:
            cells[position] = density
    layers = sorted({layer for layer, _ in cells})
    components = sorted({c for _, c in cells}, key=lambda c: (not c.startswith("attn"), c))
    matrix = torch.full((len(layers), len(components)), float("nan"))
    for (layer, component), density in cells.items():
        matrix[layers.index(layer), components.index(component)] = density
    return layers, components, matrix


@model_then_subnetwork()
def head_densities(model: Any, subnetwork: Subnetwork) -> torch.Tensor | dict[str, torch.Tensor]:
    """``[layers, heads]`` fraction of each head's Q/K/V/O weights kept, every weight counted
    once (the mask's density in the head): :func:`~subnet_interp.analysis.head_scores` with
    ``count_zeros=True``, which on a model without exact zeros equals its default (``nan``
    where a head is not covered; with grouped-query attention a shared K/V head's slice counts
    for each query head reading it). Of an encoder-decoder, a dict of them keyed
    ``"encoder.attn"``, ``"decoder.attn"``, ``"decoder.cross_attn"``, as ``head_scores``."""
    return head_scores(model, subnetwork, count_zeros=True)


@model_then_subnetwork()
def neuron_densities(model: Any, subnetwork: Subnetwork) -> torch.Tensor | dict[str, torch.Tensor]:
    """``[layers, d_mlp]`` fraction of each MLP neuron's weights kept (its ``W_in`` / ``W_gate``
    column and ``W_out`` row), every weight counted once: the mask's density in the neuron,
    :func:`~subnet_interp.analysis.neuron_scores` with ``count_zeros=True`` (``nan`` where a
    layer is not covered; of an encoder-decoder, a dict keyed ``"encoder.mlp"``,
    ``"decoder.mlp"``)."""
    return neuron_scores(model, subnetwork, count_zeros=True)


@model_then_subnetwork()
def plot_densities(
    model: Any, subnetwork: Subnetwork, *, by: str = "component", path: str | None = None
):
    """Density heatmap: per layer and component (``by="component"``; ``model`` may be ``None``),
    per layer and attention head (``by="head"``, :func:`head_densities`, needs ``model``), per
    layer and MLP neuron (``by="neuron"``, :func:`neuron_densities`, needs ``model``), or a
    bar per target for non-transformer names."""
    plt = _pyplot()
    if by in ("head", "neuron") and model is None:
        raise ValueError(f"plot_densities(by={by!r}) needs the model, for the {by} axes.")
    if by in ("head", "neuron"):
        scores = (head_densities if by == "head" else neuron_densities)(model, subnetwork)
        groups = {"": scores} if isinstance(scores, torch.Tensor) else scores
        rows = sum(m.shape[0] for m in groups.values())
        width = max(m.shape[1] for m in groups.values())
        size = (max(4.5, 1 + 0.5 * width), max(3.0, 1 + 0.4 * rows + 0.6 * (len(groups) - 1)))
        if by == "neuron":
            size = (8, max(2.5, 1 + 0.35 * rows + 0.6 * (len(groups) - 1)))
        fig, axes = plt.subplots(len(groups), 1, figsize=size, squeeze=False)
        for ax, (group, matrix) in zip(axes[:, 0], groups.items(), strict=True):
            image = ax.imshow(
                matrix.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                interpolation="nearest",
            )  # fmt: skip
            ax.set_xlabel(by)
            ax.set_ylabel("layer")
            unit = "head" if by == "head" else "MLP neuron"
            ax.set_title(f"kept fraction per {f'{group} ' if group else ''}{unit}")
            fig.colorbar(image, ax=ax)
        return _finish(fig, path)
    if by != "component":
        raise ValueError(f"by must be 'component', 'head' or 'neuron', got {by!r}.")
    layers, components, matrix = per_layer_densities(subnetwork)
    if not layers:
        densities = subnetwork.densities()
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(densities)), 3))
        ax.bar(range(len(densities)), list(densities.values()))
        ax.set_xticks(range(len(densities)), list(densities), rotation=60, ha="right")
        ax.set_ylabel("density")
        return _finish(fig, path)
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(components), 1 + 0.4 * len(layers)))
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(components)), components, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylabel("layer")
    ax.set_title(f"density {subnetwork.density():.3f}")
    fig.colorbar(image, ax=ax)
    return _finish(fig, path)


def plot_overlap(
    subnetworks: Mapping[str, Subnetwork] | Sequence[Subnetwork],
    measure: str = "iou",
    *,
    path: str | None = None,
):
    """Heatmap of ``measure`` between every pair of subnetworks."""
    plt = _pyplot()
    labels = (
        list(subnetworks)
        if isinstance(subnetworks, Mapping)
        else [str(i) for i in range(len(subnetworks))]
    )
    matrix = overlap_matrix(subnetworks, measure).float().cpu()
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(labels), 1 + 0.6 * len(labels)))
    image = ax.imshow(
        matrix.numpy(), cmap="magma", vmin=0, vmax=1 if measure != "intersection" else None
    )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", color="grey")
    ax.set_title(measure)
    fig.colorbar(image, ax=ax)
    return _finish(fig, path)


def plot_head_overlap(
    model: Any,
    a: Subnetwork,
    b: Subnetwork,
    *,
    labels: tuple[str, str] = ("A", "B"),
    path: str | None = None,
):
    """Two subnetworks head by head (:func:`~subnet_interp.analysis.head_overlap`): three
    ``[layer, head]`` heatmaps, the fraction of each head's weights both keep, only ``a`` keeps
    and only ``b`` keeps."""
    plt = _pyplot()
    result = head_overlap(model, a, b)
    panels = (
        ("shared", result.shared),
        (f"only {labels[0]}", result.only_a),
        (f"only {labels[1]}", result.only_b),
    )
    layers, heads = result.shared.shape
    fig, axes = plt.subplots(
        1, 3, figsize=(3 * max(2.5, 0.8 + 0.35 * heads) + 1, max(2.5, 1 + 0.35 * layers))
    )
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(title)
        ax.set_xlabel("head")
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_ablation(report: AblationReport, *, path: str | None = None):
    """Bars for the full model, the subnetwork kept / removed and the empty model, with the
    controls' distribution beside them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["full", "kept", "removed", "empty"]
    values = [report.full, report.kept, report.removed, report.empty]
    ax.bar(range(4), values, color=["grey", "tab:blue", "tab:orange", "lightgrey"])
    if report.controls.numel():
        jitter = torch.linspace(-0.25, 0.25, report.controls.numel())
        ax.scatter((4 + jitter).numpy(), report.controls.numpy(), s=10, color="tab:green")
        ax.errorbar(
            [4],
            [report.control_mean],
            yerr=[0 if report.controls.numel() < 2 else report.control_std],
            color="black",
            capsize=4,
        )
        names.append(f"{report.control_kind}\ncontrols")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(report.metric)
    ax.set_title(f"faithfulness {report.faithfulness:.2f}, p = {report.p_value:.3g}")
    return _finish(fig, path)


def plot_faithfulness(curve: FaithfulnessCurve, *, path: str | None = None):
    """Faithfulness against circuit size (fraction of scored weights, log x-axis as MIB's
    figures show it; a density of 0 is left out of a log axis), with the ideal ``f = 1`` and the
    empty circuit's ``f = 0`` dashed, and CPR / CMD in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    points = [(d, f) for d, f in zip(curve.densities, curve.faithfulness, strict=True) if d > 0]
    ax.plot([d for d, _ in points], [f for _, f in points], marker="o", color="tab:blue")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="lightgrey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("circuit size (fraction of scored weights)")
    ax.set_ylabel(f"faithfulness ({curve.metric})")
    ax.set_title(f"{curve.ablation} ablation: CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}")
    return _finish(fig, path)


__all__ = [
    "head_densities",
    "neuron_densities",
    "plot_head_overlap",
    "per_layer_densities",
    "plot_ablation",
    "plot_densities",
    "plot_faithfulness",
    "plot_overlap",
]
