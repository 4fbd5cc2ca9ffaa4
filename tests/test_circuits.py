"""Circuit nodes and compare_to_circuit."""

from __future__ import annotations

import pytest
import torch

from subnet_interp.analysis import Circuit, compare_to_circuit, head_node, mlp_node, roc_auc
from subnet_interp.analysis.circuits import node_position


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


def test_node_position_is_the_one_parser_of_node_names():
    assert node_position(head_node(3, 7)) == (3, 7)
    assert node_position(head_node(3, 7, "k")) == (3, 7)
    assert node_position(mlp_node(12)) == (12, None)
    assert node_position("embed") is None and node_position("unembed") is None
    with pytest.raises(ValueError, match="no circuit node name"):
        node_position("a0.h3")
    circuit = Circuit(frozenset({head_node(1, 2), mlp_node(0), "embed"}))
    assert circuit.heads() == [(1, 2)] and circuit.mlps() == [0]


def test_circuits_imports_no_format_module_at_import_time():
    import ast
    import inspect

    import subnet_interp.analysis.circuits as circuits

    tree = ast.parse(inspect.getsource(circuits))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if "format" in n], names


@pytest.mark.parametrize(
    "scores, match",
    [
        ({(0, -1): 1.0}, r"non-negative int pairs as keys; got a dict with keys \[\(0, -1\)\]"),
        (torch.zeros(2, 3, 4), r"\[layers, heads\] tensor .*got a tensor of shape \(2, 3, 4\)"),
    ],
)
def test_compare_to_circuit_names_malformed_scores(scores, match):
    with pytest.raises(TypeError, match=match):
        compare_to_circuit(scores, Circuit.from_heads([(0, 0)]))


def test_compare_to_circuit_reads_a_mapping_as_the_tensor_with_nan_for_missing_heads():
    mapping = {(1, 0): 0.9, (0, 1): 0.2}
    matrix = torch.tensor([[float("nan"), 0.2], [0.9, float("nan")]])
    circuit = Circuit.from_heads([(1, 0)])
    assert compare_to_circuit(mapping, circuit) == compare_to_circuit(matrix, circuit)
