"""auto-circuit prune scores of parallel attention / MLP models (GPT-NeoX, Pythia) and their
export to auto-circuit and EAP-IG."""

from __future__ import annotations

import pytest
import torch

from subnet_interp.analysis import Circuit, circuit_formats, head_node, mlp_node

L, H = 2, 3


def parallel_prune_scores() -> dict:
    """auto-circuit 1.0.1's PruneScores for a parallel attention / MLP model, in the shape its
    code gave for Pythia (recorded in shared/notes/interop.md): the MLP of layer L reads only the
    sources before block L (Resid Start, then per earlier layer each head and the MLP), not
    layer L's heads."""
    gen = torch.Generator().manual_seed(6)
    out = {}
    for layer in range(L):
        n_src = 1 + layer * (H + 1)
        for x in "qkv":
            out[f"blocks.{layer}.hook_{x}_input"] = torch.randn(H, n_src, generator=gen)
        out[f"blocks.{layer}.hook_mlp_in"] = torch.randn(n_src, generator=gen)
    out[f"blocks.{L - 1}.hook_resid_post"] = torch.randn(1 + L * (H + 1), generator=gen)
    for tensor in out.values():
        tensor[tensor.abs() < 0.5] = 0.0
    return out


def test_parallel_attn_mlp_prune_scores_round_trip():
    scores = parallel_prune_scores()
    circuit = Circuit.from_auto_circuit(scores)
    assert circuit.metadata["auto_circuit_parallel_attn_mlp"] is True
    assert set(circuit.edge_scores) == set(circuit_formats.all_edges(L, H, parallel_attn_mlp=True))
    assert (head_node(1, 0), mlp_node(1)) not in circuit.edge_scores
    assert circuit.edge_scores[(head_node(0, 2), mlp_node(1))] == pytest.approx(
        float(scores["blocks.1.hook_mlp_in"][3])
    )
    back = circuit.to_auto_circuit()
    assert back.keys() == scores.keys()
    assert all(torch.equal(back[k], scores[k]) for k in scores)
    data = circuit.to_eap(d_model=16)  # EAP-IG's graph of a parallel model
    assert data["cfg"]["parallel_attn_mlp"] is True
    assert "a1.h0->m1" not in data["edges"]
    again = Circuit.from_eap(data)
    assert again.edges == circuit.edges
    assert all(torch.equal(again.to_auto_circuit()[k], scores[k]) for k in scores)


def test_parallel_graph_size_matches_eap_ig_pythia_70m():
    # EAP-IG's Graph.from_model for Pythia-70m (6 layers x 8 heads): 56 nodes, 3,580 edges
    assert len(circuit_formats.all_edges(6, 8, parallel_attn_mlp=True)) == 3580
    assert len(circuit_formats.sources(6, 8)) + 1 == 56
