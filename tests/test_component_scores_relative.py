"""head_scores / neuron_scores with relative=True: comparable across layers."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import head_scores, neuron_scores, top_heads
from subnet_interp.analysis.components import _check_modes

pytest.importorskip("transformers")
from _hf_models import BUILDERS, HEADS, LAYERS  # noqa: E402

# per layer: (fraction kept of the circuit unit's weights, of every other unit's weights);
# layer 0 dense, layer 1 sparse, the circuit units the relatively densest in each layer
RATES = {0: (0.95, 0.7), 1: (0.3, 0.05)}
CIRCUIT_HEADS = {(0, 1), (1, 2)}
CIRCUIT_NEURONS = {0: [3, 10], 1: [7, 20]}


def unit_mask(shape, axis, units, rates):
    """A mask keeping the first ``rates[0]`` of each of ``units``' (indices of ``axis``)
    weights and the first ``rates[1]`` of every other index's."""
    mask = torch.zeros(shape, dtype=torch.bool).movedim(axis, 0)
    flat = mask.flatten(1)
    for unit in range(flat.shape[0]):
        flat[unit, : round(rates[unit not in units] * flat.shape[1])] = True
    return flat.view(mask.shape).movedim(0, axis)


def layered_mask(model, kind):
    masks = {}
    for name, target in si.targets(model).items():
        layer = target.layer
        if kind == "head" and "head" in target.axes:
            units = [h for lay, h in CIRCUIT_HEADS if lay == layer]
            axis = target.axes.index("head")
        elif kind == "neuron" and "neuron" in target.axes:
            units, axis = CIRCUIT_NEURONS[layer], target.axes.index("neuron")
        else:
            continue
        masks[name] = unit_mask(target.shape, axis, units, RATES[layer])
    return si.Subnetwork(masks)


def test_relative_head_scores_rank_circuit_heads_across_layers():
    """Layer 0 kept densely, layer 1 sparsely: every layer-0 head outranks the layer-1 circuit
    head by kept fraction; relative to its layer, each circuit head comes first."""
    model = BUILDERS["gpt2"]()
    sub = layered_mask(model, "head")
    old = head_scores(model, sub)
    new = head_scores(model, sub, relative=True)
    assert float(old[0].min()) > float(old[1, 2])  # the old ranking across layers is wrong
    assert {(layer, head) for layer, head, _ in top_heads(old, 2)} != CIRCUIT_HEADS
    assert {(layer, head) for layer, head, _ in top_heads(new, 2)} == CIRCUIT_HEADS
    for layer in range(LAYERS):  # the ranking within a layer is unchanged
        assert torch.equal(old[layer].argsort(), new[layer].argsort())


def test_relative_neuron_scores_rank_circuit_neurons_across_layers():
    model = BUILDERS["gpt2"]()
    sub = layered_mask(model, "neuron")
    old, new = neuron_scores(model, sub), neuron_scores(model, sub, relative=True)
    circuit = torch.zeros(old.shape, dtype=torch.bool)
    for layer, neurons in CIRCUIT_NEURONS.items():
        circuit[layer, neurons] = True
    assert float(old[1][circuit[1]].max()) < float(old[0][~circuit[0]].min())
    assert float(new[circuit].min()) > float(new[~circuit].max())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_head_as_dense_as_its_layer_scores_one(kind):
    """Every head keeps the same share of each of its matrices (a different share per layer
    and per matrix): relative scores are exactly 1, also for grouped K/V heads (llama)."""
    model = BUILDERS[kind]()
    masks = {}
    for index, (name, target) in enumerate(si.targets(model, include="blocks.*.attn.W_*").items()):
        axis = next(a for a in ("head", "kv_head") if a in target.axes)
        mask = torch.zeros(target.shape, dtype=torch.bool).movedim(target.axes.index(axis), 0)
        flat = mask.flatten(1)
        flat[:, : (index + 1) * flat.shape[1] // 16] = True  # a different share per matrix
        masks[name] = flat.view(mask.shape).movedim(0, target.axes.index(axis))
    sub = si.Subnetwork(masks)
    torch.testing.assert_close(
        head_scores(model, sub, relative=True), torch.ones(LAYERS, HEADS), rtol=1e-6, atol=0
    )
    assert not torch.allclose(head_scores(model, sub)[0], head_scores(model, sub)[1])


def test_a_removed_layer_scores_zero_and_an_uncovered_one_nan():
    model = BUILDERS["gpt2"]()
    masks = {}
    for name, target in si.targets(model, include="blocks.*.attn.W_*").items():
        if target.layer == 0:
            masks[name] = torch.zeros(target.shape, dtype=torch.bool)
    masks["blocks.1.attn.W_Q"] = torch.ones(si.targets(model)["blocks.1.attn.W_Q"].shape,
                                            dtype=torch.bool)  # fmt: skip
    scores = head_scores(model, si.Subnetwork(masks), relative=True)
    assert torch.equal(scores[0], torch.zeros(HEADS))
    assert torch.equal(scores[1], torch.ones(HEADS))
    only_layer_1 = {k: v for k, v in masks.items() if k.startswith("blocks.1.")}
    assert torch.isnan(head_scores(model, si.Subnetwork(only_layer_1), relative=True)[0]).all()


@pytest.mark.parametrize("flag", ["relative", "weighted", "count_zeros"])
def test_flags_that_are_not_booleans_are_refused(flag):
    """The library's message names the flag, the value and its type. Under pytest the runtime
    type checker (conftest.py) refuses the call first, with its own message naming the flag;
    the library's check is then read unwrapped."""
    model = BUILDERS["gpt2"]()
    typed = rf"(?s)Type-check error.*'{flag}': 'layer'"
    with pytest.raises(TypeError, match=typed):
        head_scores(model, layered_mask(model, "head"), **{flag: "layer"})
    with pytest.raises(TypeError, match=typed):
        neuron_scores(model, layered_mask(model, "neuron"), **{flag: "layer"})
    check = getattr(_check_modes, "__wrapped__", _check_modes)
    flags = {"weighted": False, "count_zeros": False, "relative": False, flag: 1}
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got 1 \(int\)"):
        check(flags["weighted"], flags["count_zeros"], flags["relative"])
