"""Every analysis function takes ``(model, subnetwork, ...)``; the old orders still work, with a
FutureWarning naming the new one. head_densities is head_scores, also on grouped-query models."""

from __future__ import annotations

import inspect

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import (
    edge_scores,
    graph_edge_scores,
    head_densities,
    head_ov,
    head_scores,
    modules,
    neuron_scores,
)
from subnet_interp.analysis._order import model_then_subnetwork

NEW_ORDER = r"call \w+\(model, subnetwork, \.\.\.\)"


@model_then_subnetwork()
def _swap(model, subnetwork, extra=None, *, flag=False):
    return model, subnetwork, extra, flag


@model_then_subnetwork(trailing=2)
def _trailing(model, subnetwork, a, b, *, flag=False):
    return model, subnetwork, a, b, flag


def test_the_helper_swaps_old_subnetwork_first_calls_and_warns():
    sub, model = si.Subnetwork({"w": torch.ones(2, dtype=torch.bool)}), object()
    assert _swap(model, sub, 3, flag=True) == (model, sub, 3, True)  # no warning
    assert _swap(model, None) == (model, None, None, False)
    assert _swap(None, sub) == (None, sub, None, False)  # a model-less call, new order
    assert _swap(model=model, subnetwork=sub) == (model, sub, None, False)
    for call in (
        lambda: _swap(sub, model, 3, flag=True),
        lambda: _swap(sub, model=model, extra=3, flag=True),
    ):
        with pytest.warns(FutureWarning, match=r"_swap\(subnetwork, model, \.\.\.\) is deprecated"):
            assert call() == (model, sub, 3, True)
    with pytest.warns(FutureWarning, match=NEW_ORDER):
        assert _swap(None, model) == (model, None, None, False)
    with pytest.warns(FutureWarning, match=NEW_ORDER):
        assert _swap(sub) == (None, sub, None, False)
    assert inspect.signature(_swap).parameters.keys() == {"model", "subnetwork", "extra", "flag"}


def test_the_helper_moves_a_trailing_subnetwork_to_second_place_and_warns():
    sub, model = si.Subnetwork({"w": torch.ones(2, dtype=torch.bool)}), object()
    assert _trailing(model, sub, 1, 2) == (model, sub, 1, 2, False)  # no warning
    assert _trailing(model, None, 1, 2, flag=True) == (model, None, 1, 2, True)
    assert _trailing(model, a=1, b=2, subnetwork=sub) == (model, sub, 1, 2, False)
    old_calls = [
        ((model, None, 1, 2, False), lambda: _trailing(model, 1, 2)),
        ((model, sub, 1, 2, False), lambda: _trailing(model, 1, 2, sub)),
        ((model, sub, 1, 2, True), lambda: _trailing(model, 1, 2, subnetwork=sub, flag=True)),
        ((model, None, 1, 2, False), lambda: _trailing(model, a=1, b=2)),
    ]
    for expected, call in old_calls:
        with pytest.warns(
            FutureWarning, match=r"\(model, \.\.\., subnetwork=\.\.\.\) is deprecated"
        ):
            assert call() == expected


def test_components_accept_the_old_order_with_a_warning():
    pytest.importorskip("transformers")
    from _hf_models import BUILDERS, random_masks

    model = BUILDERS["gpt2"]()
    sub = si.Subnetwork(random_masks(model))
    for function, args in (
        (head_scores, ()),
        (neuron_scores, ()),
        (edge_scores, ("q",)),
    ):
        new = function(model, sub, *args)
        with pytest.warns(FutureWarning, match=f"{function.__name__}.*{NEW_ORDER}"):
            old = function(sub, model, *args)
        torch.testing.assert_close(old, new, equal_nan=True)
    with pytest.warns(FutureWarning, match=NEW_ORDER):
        assert graph_edge_scores(None, model) == graph_edge_scores(model, None)


def test_plots_accept_the_old_order_with_a_warning():
    pytest.importorskip("transformers")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from _hf_models import BUILDERS, random_masks

    from subnet_interp.analysis import plot_densities

    model = BUILDERS["gpt2"]()
    sub = si.Subnetwork(random_masks(model))
    with pytest.warns(FutureWarning, match=f"head_densities.*{NEW_ORDER}"):
        torch.testing.assert_close(
            head_densities(sub, model), head_densities(model, sub), equal_nan=True
        )
    with pytest.warns(FutureWarning, match=f"plot_densities.*{NEW_ORDER}"):
        figure = plot_densities(sub, model, by="head")
    assert figure.axes[0].get_title() == "kept fraction per head"
    with pytest.warns(FutureWarning, match=f"plot_densities.*{NEW_ORDER}"):
        plot_densities(sub)  # the model was optional before
    matplotlib.pyplot.close("all")


def test_modules_and_head_ov_accept_the_trailing_subnetwork_with_a_warning():
    pytest.importorskip("transformers")
    from _hf_models import BUILDERS

    model = BUILDERS["gpt2"]()
    masks = {"blocks.1.attn.W_O": torch.rand(si.targets(model)["blocks.1.attn.W_O"].shape) < 0.5}
    sub = si.Subnetwork(masks)
    with pytest.warns(FutureWarning, match=f"head_ov.*{NEW_ORDER}"):
        torch.testing.assert_close(head_ov(model, 1, 2, sub), head_ov(model, sub, 1, 2))
    with pytest.warns(FutureWarning, match=f"head_ov.*{NEW_ORDER}"):
        torch.testing.assert_close(head_ov(model, 1, 2), head_ov(model, None, 1, 2))

    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    kept = si.Subnetwork({n: torch.rand(t.shape) < 0.7 for n, t in si.targets(net).items()})
    new = modules(net, kept, 2, null_samples=2)
    with pytest.warns(FutureWarning, match=f"modules.*{NEW_ORDER}"):
        old = modules(net, 2, subnetwork=kept, null_samples=2)
    assert old.ncut == new.ncut and old.weight_names == new.weight_names
    with pytest.warns(FutureWarning, match=f"modules.*{NEW_ORDER}"):
        assert modules(net, 2, null_samples=2).ncut == modules(net, None, 2, null_samples=2).ncut


def test_head_densities_equal_head_scores_on_a_grouped_query_model():
    pytest.importorskip("transformers")
    from _hf_models import BUILDERS, HEADS, LAYERS, random_masks

    model = BUILDERS["llama"]()
    targets = si.targets(model)
    assert targets["blocks.0.attn.W_K"].axes[0] == "kv_head"  # grouped-query attention
    assert targets["blocks.0.attn.W_K"].shape[0] < HEADS
    sub = si.Subnetwork(random_masks(model))
    densities = head_densities(model, sub)
    assert densities.shape == (LAYERS, HEADS)
    torch.testing.assert_close(densities, head_scores(model, sub))
    # only a shared K head kept: every query head reading it keeps its W_K slice
    masks = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in targets.items()}
    masks["blocks.1.attn.W_K"][1] = True  # kv head 1 serves query heads 2 and 3
    densities = head_densities(model, si.Subnetwork(masks))
    torch.testing.assert_close(densities, head_scores(model, si.Subnetwork(masks)))
    assert densities[1].tolist() == pytest.approx([0.0, 0.0, 0.25, 0.25])
    assert float(densities[0].sum()) == 0.0
