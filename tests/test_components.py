"""head_scores / neuron_scores on canonical axes."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import head_scores, neuron_scores, top_heads

pytest.importorskip("transformers")
from _hf_models import BUILDERS, HEADS, LAYERS  # noqa: E402


def only_head(model, layer, head):
    masks = {}
    for name, target in si.targets(model).items():
        mask = torch.zeros(target.shape, dtype=torch.bool)
        if name.startswith(f"blocks.{layer}.attn.") and "head" in target.axes:
            mask.select(target.axes.index("head"), head).fill_(True)
        masks[name] = mask
    return si.Subnetwork(masks)


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_a_mask_keeping_one_head_ranks_it_first(kind):
    model = BUILDERS[kind]()
    scores = head_scores(model, only_head(model, 1, 3))
    assert scores.shape == (LAYERS, HEADS)
    assert top_heads(scores, 1)[0][:2] == (1, 3)
    expected = (
        1.0 if kind != "llama" else 0.5
    )  # llama: K/V of head 3 are a shared kv head, not kept
    assert float(scores[1, 3]) == pytest.approx(expected)
    assert float(scores.sum()) == pytest.approx(expected)


def test_weighted_scores_count_weight_mass():
    model = BUILDERS["gpt2"]()
    target = si.targets(model)["blocks.0.attn.W_Q"]
    weight = target.layout.to_canonical(model.get_submodule(target.module).weight).detach()
    mask = weight.abs() > weight.abs().median()  # the heavier half of every head's W_Q
    scores = head_scores(model, si.Subnetwork({"blocks.0.attn.W_Q": mask}), weighted=True)
    plain = head_scores(model, si.Subnetwork({"blocks.0.attn.W_Q": mask}))
    assert torch.all(scores[0] > plain[0])
    assert torch.isnan(scores[1]).all()


def test_neuron_scores_read_columns_and_rows():
    model = BUILDERS["gpt2"]()
    targets = si.targets(model)
    w_in = torch.zeros(targets["blocks.0.mlp.W_in"].shape, dtype=torch.bool)
    w_out = torch.zeros(targets["blocks.0.mlp.W_out"].shape, dtype=torch.bool)
    w_in[:, 5] = True
    w_out[5] = True
    w_out[7, :4] = True
    scores = neuron_scores(
        model, si.Subnetwork({"blocks.0.mlp.W_in": w_in, "blocks.0.mlp.W_out": w_out})
    )
    assert float(scores[0, 5]) == 1.0
    assert float(scores[0, 7]) == pytest.approx(4 / 64)
    assert float(scores[0].nansum()) == pytest.approx(1 + 4 / 64)


def test_scores_need_canonical_transformer_targets():
    with pytest.raises(ValueError, match="no canonical attn targets"):
        head_scores(
            torch.nn.Sequential(torch.nn.Linear(2, 2)),
            si.Subnetwork({"0.weight": torch.ones(2, 2, dtype=torch.bool)}),
        )


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_edge_scores_match_dense_composition(kind):
    from subnet_interp.analysis import edge_scores

    model = BUILDERS["gpt2"]()
    gen = torch.Generator().manual_seed(0)
    sub = si.Subnetwork(
        {n: torch.rand(t.shape, generator=gen) < 0.7 for n, t in si.targets(model).items()}
    )
    scores = edge_scores(model, sub, kind)
    assert scores.shape == (LAYERS, HEADS, LAYERS, HEADS)
    assert torch.isnan(scores[1, :, 0]).all() and torch.isnan(scores[0, :, 0]).all()

    def canonical(letter, layer):
        target = si.targets(model)[f"blocks.{layer}.attn.W_{letter}"]
        weight = (
            target.layout.to_canonical(model.get_submodule(target.module).weight).detach().double()
        )
        return weight * sub[f"blocks.{layer}.attn.W_{letter}"]

    for a, b in ((0, 1), (3, 2)):
        ov_a = canonical("V", 0)[a] @ canonical("O", 0)[a]
        qk_b = canonical("Q", 1)[b] @ canonical("K", 1)[b].T
        right = {"q": qk_b, "k": qk_b.T, "v": canonical("V", 1)[b] @ canonical("O", 1)[b]}[kind]
        expected = torch.linalg.norm(ov_a @ right) / (
            torch.linalg.norm(ov_a) * torch.linalg.norm(right)
        )
        assert float(scores[0, a, 1, b]) == pytest.approx(float(expected), rel=1e-4)


def test_edge_scores_vanish_for_a_removed_head():
    from subnet_interp.analysis import edge_scores

    model = BUILDERS["gpt2"]()
    masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in si.targets(model).items()}
    masks["blocks.0.attn.W_O"][1] = False
    scores = edge_scores(model, si.Subnetwork(masks), "v")
    assert torch.all(scores[0, 1, 1] == 0) and torch.isnan(scores[0, 1, 0]).all()
    assert torch.all(scores[0, 0, 1] > 0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_graph_edge_scores_match_dense_products(kind):
    from subnet_interp.analysis import edge_scores, graph_edge_scores, head_node, mlp_node

    model = BUILDERS[kind]()
    gen = torch.Generator().manual_seed(1)
    sub = si.Subnetwork(
        {n: torch.rand(t.shape, generator=gen) < 0.7 for n, t in si.targets(model).items()}
    )
    scores = graph_edge_scores(model, sub)

    def canonical(name):
        target = si.targets(model, include="*")[name]
        weight = target.layout.to_canonical(model.get_submodule(target.module).weight)
        return weight.detach().double() * sub[name]

    def ratio(write, read):
        return float(
            torch.linalg.norm(write @ read) / (torch.linalg.norm(write) * torch.linalg.norm(read))
        )

    def ov(layer, h):
        v, o = canonical(f"blocks.{layer}.attn.W_V"), canonical(f"blocks.{layer}.attn.W_O")
        return v[h * v.shape[0] // HEADS] @ o[h]

    w_in = canonical("blocks.0.mlp.W_in")
    if kind == "llama":
        w_in = torch.cat([w_in, canonical("blocks.0.mlp.W_gate")], dim=1)
    w_out0 = canonical("blocks.0.mlp.W_out")
    expected = {
        (head_node(0, 1), mlp_node(0)): ratio(ov(0, 1), w_in),
        (mlp_node(0), head_node(1, 2, "v")): ratio(w_out0, ov(1, 2)),
        (mlp_node(0), mlp_node(1)): ratio(w_out0, canonical("blocks.1.mlp.W_in"))
        if kind == "gpt2"
        else scores[(mlp_node(0), mlp_node(1))],
    }
    for edge, value in expected.items():
        assert scores[edge] == pytest.approx(value, rel=1e-6), edge
    composition = edge_scores(model, sub, "q")
    assert scores[(head_node(0, 3), head_node(1, 0, "q"))] == pytest.approx(
        float(composition[0, 3, 1, 0]), rel=1e-4
    )
    # only forward edges: no head -> head within a layer, no MLP L -> head L
    assert (head_node(0, 0), head_node(0, 1, "q")) not in scores
    assert (mlp_node(1), head_node(1, 0, "k")) not in scores
    assert (head_node(1, 0), mlp_node(1)) in scores
    assert len(scores) == len(
        [e for e in si.analysis.circuit_formats.all_edges(LAYERS, HEADS) if "embed" not in str(e)]
    )


def test_structural_zeros_do_not_count_by_default():
    """A unit that is mostly exact zeros, whose every non-zero weight the mask keeps, against a
    dense unit the mask keeps half of: counting the zeros ranks the used unit below the noise
    (it looks 10% kept); the default counts only non-zero weights and ranks it first."""
    model = BUILDERS["gpt2"]()
    targets = si.targets(model)
    gen = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        for name in ("blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V"):
            target = targets[name]
            weight = target.layout.to_canonical(model.get_submodule(target.module).weight)
            zero = torch.rand(weight[0].shape, generator=gen) < 0.9  # weight: [head, d, dh]
            weight[0][zero] = 0.0  # head 0: sparse (in place), fully kept where non-zero
            mask = torch.rand(weight.shape, generator=gen) < 0.5  # other heads: half kept
            mask[0] = weight[0] != 0
            masks[name] = mask
        target = targets["blocks.0.mlp.W_in"]  # [d_model, neuron]
        w_in = target.layout.to_canonical(model.get_submodule(target.module).weight)
        w_in[:, :8][torch.rand(w_in[:, :8].shape, generator=gen) < 0.9] = 0.0
        mask = torch.rand(w_in.shape, generator=gen) < 0.5
        mask[:, :8] = w_in[:, :8] != 0
        masks["blocks.0.mlp.W_in"] = mask
    sub = si.Subnetwork(masks)
    old = head_scores(model, sub, count_zeros=True)
    new = head_scores(model, sub)
    assert old[0, 0] < old[0, 1:].min()  # inverted: the used head looks emptiest
    assert float(new[0, 0]) == 1.0 and new[0, 0] > new[0, 1:].max()
    torch.testing.assert_close(new[0, 1:], old[0, 1:], atol=0.02, rtol=0)  # dense: unchanged
    assert torch.all(head_scores(model, sub, weighted=True)[0, 0] > 0.99)
    old_n = neuron_scores(model, sub, count_zeros=True)[0]
    new_n = neuron_scores(model, sub)[0]
    assert old_n[:8].max() < old_n[8:].min()
    assert torch.all(new_n[:8] == 1.0) and new_n[:8].min() > new_n[8:].max()
    with pytest.raises(ValueError, match="count_zeros"):
        head_scores(model, sub, weighted=True, count_zeros=True)


def test_a_unit_of_only_zeros_scores_nan_unless_zeros_count():
    model = BUILDERS["gpt2"]()
    target = si.targets(model)["blocks.0.mlp.W_out"]  # [neuron, d_model]
    with torch.no_grad():
        target.layout.to_canonical(model.get_submodule(target.module).weight)[3] = 0.0
    sub = si.Subnetwork({"blocks.0.mlp.W_out": torch.ones(target.shape, dtype=torch.bool)})
    assert torch.isnan(neuron_scores(model, sub)[0, 3])
    assert float(neuron_scores(model, sub, count_zeros=True)[0, 3]) == 1.0
    assert float(neuron_scores(model, sub)[0, 4]) == 1.0
