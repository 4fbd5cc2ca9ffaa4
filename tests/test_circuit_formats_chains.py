"""Circuits passed from one tool's format to another keep their edges and scores."""

from __future__ import annotations

import math

import pytest

from subnet_interp.analysis import Circuit, head_node, mlp_node

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
