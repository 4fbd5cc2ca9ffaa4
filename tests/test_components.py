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
    scores = head_scores(only_head(model, 1, 3), model)
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
    scores = head_scores(si.Subnetwork({"blocks.0.attn.W_Q": mask}), model, weighted=True)
    plain = head_scores(si.Subnetwork({"blocks.0.attn.W_Q": mask}), model)
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
        si.Subnetwork({"blocks.0.mlp.W_in": w_in, "blocks.0.mlp.W_out": w_out}), model
    )
    assert float(scores[0, 5]) == 1.0
    assert float(scores[0, 7]) == pytest.approx(4 / 64)
    assert float(scores[0].nansum()) == pytest.approx(1 + 4 / 64)


def test_scores_need_canonical_transformer_targets():
    with pytest.raises(ValueError, match="no canonical attn targets"):
        head_scores(
            si.Subnetwork({"0.weight": torch.ones(2, 2, dtype=torch.bool)}),
            torch.nn.Sequential(torch.nn.Linear(2, 2)),
        )
