"""ACDC's ground truths (ACDC commit bc99ace, rebuilt in ``_tool_graphs``): for GPT-2 small
``get_ioi_true_edges`` / ``get_greaterthan_true_edges`` from ACDC's published head groups and
the way those functions and ``iterative_correspondence_from_mask`` set edges, for the
attention-only docstring model ``get_docstring_subgraph_true_edges``' edge list. They import
with their heads and MLPs and export to the identical object (ordered dicts in ACDC's
order); the comparison helpers on them give the overlaps counted by hand."""

from __future__ import annotations

import pytest
import torch
from _tool_graphs import (
    GPT2_SMALL,
    GREATERTHAN_GROUPS,
    IOI_GROUPS,
    PLACEHOLDER,
    Shape,
    acdc_graph,
    docstring_true_edges,
    greaterthan_true_edges,
    ioi_true_edges,
    is_internal,
)

from subnet_interp.analysis import (
    Circuit,
    compare_circuits,
    compare_to_circuit,
    head_node,
    node_of,
)

IOI_HEADS = sorted(head for group in IOI_GROUPS.values() for head in group)
GT_HEADS = sorted(
    (layer, h) for g in GREATERTHAN_GROUPS.values() for layer, h in g if h is not None
)


def kinds(truth) -> tuple[int, int, int]:
    """(residual edges, hook_q/k/v_input -> hook_q/k/v, other internal edges)."""
    residual = sum(not is_internal(k) for k in truth)
    into_qkv = sum(is_internal(k) and k[2].endswith("_input") for k in truth)
    return residual, into_qkv, len(truth) - residual - into_qkv


@pytest.fixture(scope="module")
def ioi():
    return ioi_true_edges()


@pytest.fixture(scope="module")
def greaterthan():
    return greaterthan_true_edges()


def test_ioi_ground_truth_has_acdc_s_counts_and_round_trips(ioi):
    assert len(ioi) == 1_131 and kinds(ioi) == (963, 78, 90)
    graph = acdc_graph(GPT2_SMALL)  # ACDC's count_no_edges: present and not a placeholder
    assert sum(graph[k] != PLACEHOLDER for k in ioi) == 1_041
    circuit = Circuit.from_acdc(ioi, n_heads=12)
    assert len(IOI_HEADS) == 26 and circuit.heads() == IOI_HEADS
    assert circuit.mlps() == list(range(12))  # ACDC wires every MLP
    assert len(circuit.edges) == 963 and (circuit.n_layers, circuit.n_heads) == (12, 12)
    assert circuit.to_acdc() == ioi  # OrderedDicts: every key, in ACDC's order
    # a circuit with the same edges but nothing read from ACDC gets the same dict this way
    plain = Circuit(circuit.nodes, circuit.edges, n_layers=12, n_heads=12)
    assert plain.to_acdc(internal=True) == ioi
    assert len(plain.to_acdc()) == 963


def test_greaterthan_ground_truth_has_acdc_s_counts_and_round_trips(greaterthan):
    assert len(greaterthan) == 289 and kinds(greaterthan) == (235, 27, 27)
    circuit = Circuit.from_acdc(greaterthan, n_heads=12)
    assert circuit.heads() == GT_HEADS and len(GT_HEADS) == 9
    # CIRCUIT lists MLPs 0-3 and 8-11, but the true edges wire MLPs 4-7 too
    assert circuit.mlps() == list(range(12))
    assert circuit.to_acdc() == greaterthan
    # get_greaterthan_true_edges has no hook_mlp_in -> hook_mlp_out edges; internal=True adds
    # them (the IOI form), which is why internal edges read are written back as read
    plain = Circuit(circuit.nodes, circuit.edges, n_layers=12, n_heads=12)
    extra = [k for k in plain.to_acdc(internal=True) if k not in greaterthan]
    assert len(extra) == 12 and all(k[0].endswith("hook_mlp_out") for k in extra)


def test_compare_circuits_on_the_ground_truths(ioi, greaterthan):
    a = Circuit.from_acdc(ioi, n_heads=12)
    b = Circuit.from_acdc(greaterthan, n_heads=12)
    same = compare_circuits(a, a)
    assert same.edges["intersection"] == 963 and same.edges["iou"] == 1.0
    assert same.edges["n"] == 32_491 and same.edges["p_value"] < 1e-100
    assert same.nodes["intersection"] == 26 + 12 and same.nodes["n"] == 12 * 13
    # shared: heads 0.1, 5.5 and 6.9, and the 12 MLPs; edges counted on ACDC's own keys
    both = compare_circuits(a, b)
    assert both.nodes["intersection"] == 15
    assert both.nodes["iou"] == pytest.approx(15 / (38 + 21 - 15))
    shared = {k for k in ioi if not is_internal(k)} & {k for k in greaterthan if not is_internal(k)}
    assert both.edges["intersection"] == len(shared) > 0
    assert both.edges["iou"] == pytest.approx(len(shared) / (963 + 235 - len(shared)))
    assert both.edges["expected"] == pytest.approx(963 * 235 / 32_491)


def test_compare_circuits_on_a_subset_of_ioi(ioi):
    full = Circuit.from_acdc(ioi, n_heads=12)
    movers = {head_node(layer, h) for layer, h in IOI_GROUPS["name mover"]}
    sub_edges = frozenset(e for e in full.edges if e[0] in movers or node_of(e[1]) in movers)
    sub = Circuit(frozenset(), sub_edges, n_layers=12, n_heads=12)
    result = compare_circuits(full, sub)
    assert result.edges["intersection"] == len(sub_edges) > 0
    assert result.edges["iou"] == pytest.approx(len(sub_edges) / 963)
    assert result.edges["sharing_b"] == 1.0
    assert result.nodes["sharing_b"] == 1.0


def test_compare_to_circuit_on_the_ioi_heads(ioi):
    circuit = Circuit.from_acdc(ioi, n_heads=12)
    scores = torch.zeros(12, 12)
    for layer, h in IOI_GROUPS["name mover"]:
        scores[layer, h] = 1.0
    top3 = compare_to_circuit(scores, circuit, k=3)
    assert (top3.precision_at_k, top3.recall_at_k, top3.overlap) == (1.0, 3 / 26, 3)
    # 3 circuit heads above all 118 others, the other 23 tied with them: ties count half
    assert top3.auc == pytest.approx((3 + 0.5 * 23) / 26)
    labels = torch.tensor([[(layer, h) in IOI_HEADS for h in range(12)] for layer in range(12)])
    perfect = compare_to_circuit(scores + labels.float(), circuit)
    assert perfect.auc == 1.0 and perfect.precision_at_k == 1.0 and perfect.k == 26
    gt_scores = {
        (layer, h): float((layer, h) in GT_HEADS) for layer in range(12) for h in range(12)
    }
    gt = compare_to_circuit(gt_scores, circuit, k=9)
    assert gt.overlap == 3 and gt.precision_at_k == pytest.approx(3 / 9)
    assert gt.expected_overlap == pytest.approx(9 * 26 / 144)


def test_docstring_ground_truth_of_an_attention_only_model_round_trips():
    truth = docstring_true_edges()
    assert len(truth) == 37 and kinds(truth) == (24, 13, 0)
    circuit = Circuit.from_acdc(truth, n_heads=8)
    assert circuit.heads() == [(0, 5), (1, 2), (1, 4), (2, 0), (3, 0), (3, 6)]
    assert circuit.mlps() == [] and circuit.n_layers == 4
    assert circuit.to_acdc() == truth
    # the complete graph for load_subgraph of the attention-only model: its keys, no MLP
    complete = circuit.to_acdc(complete=True, attn_only=True)
    attn_only = acdc_graph(Shape("docstring", 4, 8, attn_only=True))
    assert list(complete) == list(attn_only)
    assert {k for k, v in complete.items() if v and not is_internal(k)} == {
        k for k in truth if not is_internal(k)
    }
