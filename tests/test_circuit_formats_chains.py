"""Circuits passed from one tool's format to another keep their edges and scores."""

from __future__ import annotations

import math

import pytest
import torch

from subnet_interp.analysis import (
    Circuit,
    compare_circuits,
    compare_to_circuit,
    head_node,
    mlp_node,
)
from subnet_interp.analysis.circuits import all_edges

L, H = 2, 4


def test_a_node_circuit_keeps_its_edges_through_eap_ig_then_auto_circuit():
    nodes = Circuit.from_heads([(1, 2)], mlps=[0]).nodes
    circuit = Circuit(nodes, n_layers=L, n_heads=H)
    eap = Circuit.from_eap(circuit.to_eap(d_model=32))
    assert eap.edges and not eap.edge_scores  # EAP-IG's 0.0 is "not scored"
    back = Circuit.from_auto_circuit(eap.to_auto_circuit())
    assert back.edges == eap.edges
    assert back.heads() == [(1, 2)] and back.mlps() == [0]


def test_unscored_edges_of_a_scored_circuit_survive_the_chain():
    scored = {
        (head_node(0, 1), head_node(1, 2, "q")): 0.7,
        (head_node(0, 1), mlp_node(1)): -0.2,
        (mlp_node(0), head_node(1, 2, "v")): 0.1,
    }
    unscored = {("embed", head_node(0, 1, "q")), (head_node(1, 2), "unembed")}
    circuit = Circuit(frozenset(), frozenset(set(scored) | unscored), scored, n_layers=L, n_heads=H)
    eap = Circuit.from_eap(circuit.to_eap(d_model=32))
    assert eap.edges == circuit.edges and eap.edge_scores == scored
    back = Circuit.from_auto_circuit(eap.to_auto_circuit())
    assert back.edges == circuit.edges
    assert {e: back.edge_scores[e] for e in scored} == pytest.approx(scored)


@pytest.mark.parametrize("bad", [0.0, math.nan])
def test_auto_circuit_refuses_circuit_edges_it_would_read_as_outside(bad):
    edge = (head_node(0, 1), head_node(1, 2, "q"))
    circuit = Circuit(frozenset(), frozenset({edge}), {edge: bad}, n_layers=L, n_heads=H)
    with pytest.raises(ValueError, match="score of 0 or NaN.*Pass scores=False"):
        circuit.to_auto_circuit()
    membership = circuit.to_auto_circuit(scores=False)
    assert Circuit.from_auto_circuit(membership).edges == {edge}


def _attention_only(edges) -> Circuit:
    circuit = Circuit(frozenset(), frozenset(edges), n_layers=L, n_heads=H)
    return Circuit.from_auto_circuit(circuit.to_auto_circuit(attn_only=True))


def test_compare_circuits_counts_chance_on_an_attention_only_graph():
    """Read from attention-only prune scores, circuits are compared among the model's 8 heads
    and its 81 edges, not a graph with MLPs; the chance level is the hypergeometric one."""
    a = _attention_only(
        {
            ("embed", head_node(0, 1, "q")),
            (head_node(0, 1), head_node(1, 2, "v")),
            (head_node(1, 2), "unembed"),
        }  # fmt: skip
    )
    b = _attention_only(
        {
            ("embed", head_node(0, 1, "q")),
            (head_node(0, 2), head_node(1, 3, "k")),
            (head_node(1, 3), "unembed"),
        }  # fmt: skip
    )
    result = compare_circuits(a, b)
    assert result.nodes["n"] == L * H and result.edges["n"] == 81
    assert len(set(all_edges(L, H, attn_only=True))) == 81
    assert result.nodes["expected"] == pytest.approx(2 * 3 / 8)
    assert result.nodes["p_value"] == pytest.approx(1 - math.comb(6, 3) / math.comb(8, 3))
    with_mlps = Circuit(frozenset({head_node(0, 1), mlp_node(0)}), n_layers=L, n_heads=H)
    with pytest.raises(ValueError, match="attention-only model, but the circuits have MLPs"):
        compare_circuits(a, with_mlps)
    parallel = Circuit(
        frozenset({head_node(0, 1)}), n_layers=L, n_heads=H,
        metadata={"eap_cfg": {"parallel_attn_mlp": True}},
    )  # fmt: skip
    sequential = Circuit(
        frozenset({head_node(0, 1)}), n_layers=L, n_heads=H,
        metadata={"eap_cfg": {"parallel_attn_mlp": False}},
    )  # fmt: skip
    with pytest.raises(ValueError, match="different models.*parallel attention and MLP"):
        compare_circuits(parallel, sequential)


def test_compare_to_circuit_refuses_scores_of_another_model_shape():
    circuit = Circuit.from_eap(
        Circuit(frozenset({head_node(1, 2), head_node(0, 1)}), n_layers=2, n_heads=4).to_eap(
            d_model=32
        )
    )
    assert compare_to_circuit(torch.rand(2, 4), circuit).auc >= 0
    for shape in [(2, 8), (3, 4), (4, 8)]:
        with pytest.raises(ValueError, match=r"2 x 4: compare scores and a circuit of the same"):
            compare_to_circuit(torch.rand(shape), circuit)
