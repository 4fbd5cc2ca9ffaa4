"""Subnetwork views: per-neuron densities, two subnetworks compared head by head, and their
figures."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import (
    head_overlap,
    neuron_densities,
    plot_densities,
    plot_head_overlap,
)

pytest.importorskip("transformers")
from _hf_models import BUILDERS, HEADS, LAYERS, random_masks  # noqa: E402


def full(model, include="blocks.*"):
    return {
        n: torch.ones(t.shape, dtype=torch.bool)
        for n, t in si.targets(model, include=include).items()
    }


def test_head_overlap_splits_each_head_into_shared_only_a_and_only_b():
    model = BUILDERS["gpt2"]()
    a, masks = si.Subnetwork(full(model)), full(model)
    masks["blocks.1.attn.W_Q"][2] = False  # a quarter of head 1.2's weights
    b = si.Subnetwork(masks)
    result = head_overlap(model, a, b)
    assert result.shared.shape == (LAYERS, HEADS)
    assert float(result.shared[1, 2]) == pytest.approx(0.75) and float(result.only_a[1, 2]) == 0.25
    assert float(result.only_b.abs().max()) == 0.0 and float(result.shared[0, 0]) == 1.0
    c, d = (si.Subnetwork(random_masks(model, seed=s)) for s in (1, 2))
    parts = head_overlap(model, c, d)
    union = parts.shared + parts.only_a + parts.only_b
    assert torch.allclose(union, head_overlap(model, c | d, c | d).shared)
    with pytest.raises(TypeError, match=r"(?s)two si.Subnetwork objects; b is a dict|Type-check"):
        head_overlap(model, a, masks)


def test_neuron_densities_count_each_neurons_column_and_row():
    model = BUILDERS["gpt2"]()
    masks = full(model, "blocks.*.mlp.*")
    masks["blocks.0.mlp.W_out"][5] = False  # neuron 5's W_out row: half its weights
    density = neuron_densities(model, si.Subnetwork(masks))
    assert density.shape == (LAYERS, masks["blocks.0.mlp.W_in"].shape[1])
    assert float(density[0, 5]) == pytest.approx(0.5) and float(density[1, 5]) == 1.0


def test_neuron_and_comparison_figures(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model = BUILDERS["gpt2"]()
    a, b = (si.Subnetwork(random_masks(model, seed=s)) for s in (1, 2))
    figures = [
        plot_densities(model, a, by="neuron", path=str(tmp_path / "neurons.png")),
        plot_head_overlap(model, a, b, labels=("x", "y"), path=str(tmp_path / "heads.png")),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    assert [ax.get_title() for ax in figures[1].axes[:3]] == ["shared", "only x", "only y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.png", "neurons.png"]
    with pytest.raises(ValueError, match="by='neuron'.*needs the model"):
        plot_densities(None, a, by="neuron")
    with pytest.raises(ValueError, match="'component', 'head' or 'neuron', got 'layer'"):
        plot_densities(None, a, by="layer")
