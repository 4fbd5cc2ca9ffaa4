"""Circuit nodes and compare_to_circuit."""

from __future__ import annotations

import pytest
import torch

from subnet_interp.analysis import Circuit, compare_to_circuit, head_node, roc_auc


def test_node_names_are_checked():
    with pytest.raises(KeyError, match=r"Unknown circuit node name\(s\) \['a0.3'\]"):
        Circuit(frozenset({"a0.3"}))
    circuit = Circuit(frozenset(), frozenset({(head_node(0, 1), "blocks.1.mlp")}))
    assert circuit.nodes == {"blocks.0.attn.head.1", "blocks.1.mlp"}


def test_roc_auc_matches_pairwise_definition():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.1, 0.5])
    labels = torch.tensor([True, False, True, False, False])
    # positives {0.9, 0.8} vs negatives {0.8, 0.1, 0.5}: wins 3 + 2, one tie
    assert roc_auc(scores, labels) == pytest.approx((3 + 2 + 0.5) / 6)


def test_perfect_scores_rank_the_circuit_first():
    scores = torch.zeros(3, 4)
    scores[1, 2], scores[2, 0] = 0.9, 0.7
    result = compare_to_circuit(scores, Circuit.from_heads([(1, 2), (2, 0)]))
    assert result.auc == 1.0 and result.precision_at_k == 1.0 and result.recall_at_k == 1.0
    assert result.expected_overlap == pytest.approx(2 * 2 / 12)
    assert result.p_value == pytest.approx(1 / 66)  # both of 2 picks right: 1 / C(12, 2)


def test_nan_scores_count_as_lowest_and_bad_heads_are_refused():
    scores = torch.full((2, 2), float("nan"))
    scores[0, 0] = 0.1
    assert compare_to_circuit(scores, Circuit.from_heads([(0, 0)])).auc == 1.0
    with pytest.raises(KeyError, match="do not exist in a model with 2 layers"):
        compare_to_circuit(scores, Circuit.from_heads([(5, 0)]))
