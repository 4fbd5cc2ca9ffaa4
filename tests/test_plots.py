"""Figures: each returns a Figure and saves a PNG (matplotlib, Agg)."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import (
    ablation_effect,
    loss,
    plot_ablation,
    plot_densities,
    plot_overlap,
)
from subnet_interp.analysis.plots import head_densities, per_layer_densities
from subnet_interp.tasks import planted_mlp

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
pytest.importorskip("transformers")
from _hf_models import BUILDERS, HEADS, LAYERS, random_masks  # noqa: E402


def test_head_densities_average_each_heads_slices():
    model = BUILDERS["gpt2"]()
    masks = {
        n: torch.ones(t.shape, dtype=torch.bool)
        for n, t in si.targets(model, include="blocks.*.attn.*").items()
    }
    masks["blocks.1.attn.W_Q"][2] = False  # one of head 2's four matrices in layer 1
    matrix = head_densities(model, si.Subnetwork(masks))
    assert matrix.shape == (LAYERS, HEADS)
    assert float(matrix[1, 2]) == pytest.approx(0.75) and float(matrix[0, 2]) == 1.0


def test_per_layer_densities_shape():
    layers, components, matrix = per_layer_densities(
        si.Subnetwork(random_masks(BUILDERS["gpt2"]()))
    )
    assert layers == [0, 1] and components[:4] == ["attn.W_K", "attn.W_O", "attn.W_Q", "attn.W_V"]
    assert matrix.shape == (2, 6) and not torch.isnan(matrix).any()


def test_every_plot_returns_a_figure_and_saves(tmp_path):
    model = BUILDERS["gpt2"]()
    a, b = si.Subnetwork(random_masks(model, seed=1)), si.Subnetwork(random_masks(model, seed=2))
    figures = [
        plot_densities(None, a, path=str(tmp_path / "layers.png")),
        plot_densities(model, a, by="head", path=str(tmp_path / "heads.png")),
        plot_overlap({"a": a, "b": b, "a&b": a & b}, path=str(tmp_path / "overlap.png")),
    ]
    task = planted_mlp()
    report = ablation_effect(
        task.model, task.planted, loss(task.loss_fn), task.batches(256), controls=4
    )
    figures.append(plot_ablation(report, path=str(tmp_path / "ablation.png")))
    figures.append(plot_densities(None, task.planted, path=str(tmp_path / "plain.png")))
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ablation.png",
        "heads.png",
        "layers.png",
        "overlap.png",
        "plain.png",
    ]
    with pytest.raises(ValueError, match="needs the model"):
        plot_densities(None, a, by="head")
