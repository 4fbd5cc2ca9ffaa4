"""Circuits in other tools' formats (EAP-IG / MIB, ACDC, auto-circuit) and our own: round trips,
graph sizes that match the tools' own files, and clear errors."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch

from subnet_interp.analysis import (
    Circuit,
    OverlapStats,
    circuit_formats,
    compare_circuits,
    compare_edges,
    head_node,
    mlp_node,
)

L, H = 2, 3


def eap_graph(seed: int = 0) -> dict:
    """An EAP-IG ``Graph.to_json`` dict built from EAP-IG's naming rules (independently of
    circuit_formats): every real edge scored, a random subset in the graph."""
    gen = torch.Generator().manual_seed(seed)
    parents = ["input"]
    for layer in range(L):
        parents += [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]
    edges = {}

    def layer_of(name):
        return -1 if name == "input" else int(name[1:].split(".")[0])

    for layer in range(L):
        for x in "qkv":
            for h in range(H):
                for p in parents:
                    if layer_of(p) < layer:
                        edges[f"{p}->a{layer}.h{h}<{x}>"] = None
        for p in parents:
            if layer_of(p) < layer or (p.startswith("a") and layer_of(p) == layer):
                edges[f"{p}->m{layer}"] = None
    for p in parents:
        edges[f"{p}->logits"] = None
    chosen = set()
    for name in edges:
        score = float(torch.randn((), generator=gen))
        keep = bool(torch.rand((), generator=gen) < 0.3)
        edges[name] = {"score": score, "in_graph": keep}
        if keep:
            chosen |= set(name.split("<")[0].split("->"))
    nodes = {p: {"in_graph": p in chosen or p == "input"} for p in parents}
    for name, entry in edges.items():  # nodes of in-graph edges are in the graph
        if entry["in_graph"]:
            a, b = name.split("<")[0].split("->")
            nodes.setdefault(a, {"in_graph": True})["in_graph"] = True
            if b != "logits":
                nodes[b]["in_graph"] = True
    nodes["logits"] = {"in_graph": True}
    cfg = {"n_layers": L, "n_heads": H, "parallel_attn_mlp": False, "d_model": 16}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def test_eap_graph_round_trips_exactly(tmp_path):
    data = eap_graph()
    circuit = Circuit.from_eap(data)
    assert circuit.n_layers == L and circuit.n_heads == H
    assert (head_node(0, 1), head_node(1, 2, "q")) in circuit.edge_scores
    in_graph = {k for k, v in data["edges"].items() if v["in_graph"]}
    assert len(circuit.edges) == len(in_graph)
    assert circuit.to_eap() == data
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(data))
    assert Circuit.load(path).to_eap(tmp_path / "out.json") == data
    assert json.loads((tmp_path / "out.json").read_text()) == data


def test_eap_graph_size_matches_mib_gpt2_files():
    # MIB's circuits/ioi-eap-ig.json for GPT-2 small has 158 nodes and 32,491 edges
    assert len(circuit_formats.all_edges(12, 12)) == 32491
    assert len(circuit_formats.sources(12, 12)) + 1 == 158


def test_eap_neuron_data_and_node_scores_survive():
    data = eap_graph(1)
    data["nodes"]["m0"].update(neurons=[True, False] * 8, neurons_scores=[0.5] * 16, score=0.25)
    circuit = Circuit.from_eap(data)
    assert circuit.node_scores[mlp_node(0)] == 0.25
    assert circuit.to_eap() == data


def test_eap_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"keys \['edges'\] are missing"):
        Circuit.from_eap({"cfg": {}, "nodes": {}})
    data = eap_graph()
    data["edges"]["a0.h9x->logits"] = {"score": 0.0, "in_graph": False}
    with pytest.raises(ValueError, match="Unknown EAP-IG node name 'a0.h9x'"):
        Circuit.from_eap(data)
    with pytest.raises(ValueError, match="needs the model's shape"):
        Circuit(frozenset({head_node(0, 0)})).to_eap()


@dataclass(frozen=True)
class TorchIndex:  # ACDC's index type, as far as the importer relies on it
    hashable_tuple: tuple


@dataclass
class Edge:  # ACDC's Edge, as far as the importer relies on it
    present: bool
    effect_size: float | None = None


def test_acdc_true_edges_and_edge_objects():
    head = TorchIndex((None, None, 2))
    ioi_style = OrderedDict(
        {
            (
                "blocks.1.hook_q_input",
                (None, None, 0),
                "blocks.0.attn.hook_result",
                (None, None, 2),
            ): True,
            (
                "blocks.1.hook_resid_post",
                (None,),
                "blocks.1.attn.hook_result",
                (None, None, 0),
            ): True,
            ("blocks.0.hook_mlp_in", (None,), "blocks.0.hook_resid_pre", (None,)): True,
        }
    )
    circuit = Circuit.from_acdc(ioi_style, n_heads=H)
    assert circuit.edges == {
        (head_node(0, 2), head_node(1, 0, "q")),
        (head_node(1, 0), "unembed"),
        ("embed", mlp_node(0)),
    }
    assert circuit.n_layers == 2
    assert Circuit.from_acdc(circuit.to_acdc(), n_heads=H) == circuit
    objects = {
        ("blocks.1.hook_v_input", head, "blocks.0.hook_mlp_out", TorchIndex((None,))): Edge(
            True, 0.125
        ),
        ("blocks.1.hook_k_input", head, "blocks.0.hook_mlp_out", TorchIndex((None,))): Edge(
            False, -0.5
        ),
    }
    read = Circuit.from_acdc(objects)
    assert read.edges == {(mlp_node(0), head_node(1, 2, "v"))}
    assert read.edge_scores[(mlp_node(0), head_node(1, 2, "k"))] == -0.5
    pairs = [(key, 0.25) for key in ioi_style]  # save_edges' list of (key, effect size)
    assert Circuit.from_acdc(pairs).edges == circuit.edges


def test_acdc_complete_subgraph_round_trips():
    gen = torch.Generator().manual_seed(3)
    universe = circuit_formats.all_edges(L, H)
    chosen = [e for e in universe if torch.rand((), generator=gen) < 0.2]
    circuit = Circuit(frozenset(), frozenset(chosen), n_layers=L, n_heads=H)
    complete = circuit.to_acdc(complete=True)
    internal = 2 * 3 * L * H + L  # q/k/v_input -> hook_q/k/v -> hook_result, mlp_in -> mlp_out
    assert len(complete) == len(universe) + internal
    again = Circuit.from_acdc(complete, n_heads=H)
    assert again == circuit
    assert again.to_acdc(complete=True) == complete
    # an internal edge ACDC removed is kept, not silently re-added
    key = next(k for k, v in complete.items() if v and k[0].endswith("attn.hook_q"))
    complete[key] = False
    assert Circuit.from_acdc(complete, n_heads=H).to_acdc(complete=True) == complete


def test_acdc_errors():
    with pytest.raises(ValueError, match="Unknown ACDC hook name 'blocks.0.hook_z'"):
        Circuit.from_acdc({("blocks.0.hook_z", (None,), "hook_embed", (None,)): True})
    with pytest.raises(ValueError, match=r"needs an index \(None, None, h\)"):
        Circuit.from_acdc({("blocks.0.hook_q_input", (None,), "hook_embed", (None,)): True})
    with pytest.raises(ValueError, match="name its q, k or v input"):
        Circuit(frozenset(), frozenset({("embed", head_node(0, 0))})).to_acdc()


def auto_circuit_scores(attn_only: bool = False) -> dict:
    gen = torch.Generator().manual_seed(4)
    per_layer = H + (0 if attn_only else 1)
    out = {}
    for layer in range(L):
        n_src = 1 + layer * per_layer
        for x in "qkv":
            out[f"blocks.{layer}.hook_{x}_input"] = torch.randn(H, n_src, generator=gen)
        if not attn_only:
            out[f"blocks.{layer}.hook_mlp_in"] = torch.randn(n_src + H, generator=gen)
    out[f"blocks.{L - 1}.hook_resid_post"] = torch.randn(1 + L * per_layer, generator=gen)
    for tensor in out.values():
        tensor[tensor.abs() < 0.5] = 0.0
    return out


@pytest.mark.parametrize("attn_only", [False, True])
def test_auto_circuit_prune_scores_round_trip(attn_only):
    scores = auto_circuit_scores(attn_only)
    circuit = Circuit.from_auto_circuit(scores)
    assert circuit.n_layers == L and circuit.n_heads == H
    n_nonzero = sum(int((t != 0).sum()) for t in scores.values())
    assert len(circuit.edges) == n_nonzero
    back = circuit.to_auto_circuit()
    assert back.keys() == scores.keys()
    assert all(torch.equal(back[k], scores[k]) for k in scores)
    # source order: Resid Start, then per layer each head and the MLP
    dst = head_node(1, 2, "k")
    src_index = 1 + 1 if not attn_only else 1 + 1
    assert circuit.edge_scores[(head_node(0, 1), dst)] == pytest.approx(
        float(scores["blocks.1.hook_k_input"][2, src_index])
    )
    top = Circuit.from_auto_circuit(scores, top_k=5)
    assert len(top.edges) == 5


def test_auto_circuit_edge_names_and_membership():
    named = {"A0.1->A1.2.Q": 0.5, "Resid Start->MLP 0": 1.0, "MLP 1->Resid End": [3]}
    circuit = Circuit.from_auto_circuit(named)
    assert circuit.edges == {
        (head_node(0, 1), head_node(1, 2, "q")),
        ("embed", mlp_node(0)),
        (mlp_node(1), "unembed"),
    }
    shaped = Circuit(circuit.nodes, circuit.edges, n_layers=L, n_heads=H)
    membership = shaped.to_auto_circuit(scores=False)
    assert float(membership["blocks.1.hook_q_input"][2, 2]) == 1.0
    assert sum(float(t.sum()) for t in membership.values()) == 3
    assert Circuit.from_auto_circuit(membership).edges == shaped.edges
    with pytest.raises(ValueError, match=r"have shape \(3, 4\), expected \(3, 1\)"):
        bad = auto_circuit_scores()
        bad["blocks.0.hook_q_input"] = torch.zeros(H, 4)
        Circuit.from_auto_circuit(bad)


def test_own_format_round_trips_everything(tmp_path):
    circuit = Circuit.from_eap(eap_graph(2))
    path = tmp_path / "c.json"
    circuit.save(path)
    again = Circuit.load(path)
    assert again == circuit and again.metadata == circuit.metadata
    assert again.to_eap() == circuit.to_eap()
    data = json.loads(path.read_text())
    data["subnet_interp_circuit"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version 99"):
        Circuit.load(path)
    path.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="neither a subnet_interp circuit"):
        Circuit.load(path)


@pytest.mark.filterwarnings("ignore:compare_circuits.*is deprecated:FutureWarning")  # old keys
def test_compare_circuits_and_edges_with_chance():
    a = Circuit.from_auto_circuit(auto_circuit_scores())
    same = compare_circuits(a, a)
    assert same.edges["jaccard"] == 1.0 and same.edges["p_value"] < 1e-6
    assert same.nodes["shared"] == same.nodes["size_a"]
    universe = circuit_formats.all_edges(L, H)
    rest = [e for e in universe if e not in a.edges]
    b = Circuit(frozenset(), frozenset(rest), n_layers=L, n_heads=H)
    assert compare_circuits(a, b).edges["shared"] == 0
    perfect = {e: (1.0 if e in a.edges else 0.0) for e in universe}
    result = compare_edges(perfect, a)
    assert result.auc == 1.0 and result.precision_at_k == 1.0
    flipped = compare_edges({e: -v for e, v in perfect.items()}, a)
    assert flipped.auc == 0.0


def test_compare_circuits_uses_the_overlap_stats_keys_and_warns_on_the_old_ones():
    a = Circuit.from_auto_circuit(auto_circuit_scores())
    b = Circuit(frozenset(), frozenset(sorted(a.edges)[:3]), n_layers=L, n_heads=H)
    result = compare_circuits(a, b)
    stats = OverlapStats(
        len(circuit_formats.all_edges(L, H)), len(a.edges), len(b.edges), len(a.edges & b.edges)
    )
    assert {k: result.edges[k] for k in stats.as_dict()} == stats.as_dict()
    assert set(result.edges) == set(stats.as_dict()) | {"expected", "p_value"}
    assert set(result.nodes) == set(result.edges)
    for old, new in (("shared", "intersection"), ("jaccard", "iou"), ("universe", "n")):
        with pytest.warns(FutureWarning, match=f"key '{old}' is deprecated; use '{new}'"):
            assert result.edges[old] == result.edges[new]
    with pytest.raises(KeyError):
        result.edges["nope"]


def test_compare_circuits_refuses_circuits_of_different_models():
    a = Circuit(frozenset({head_node(0, 0)}), n_layers=2, n_heads=3)
    b = Circuit(frozenset({head_node(0, 0)}), n_layers=4, n_heads=3)
    with pytest.raises(ValueError, match="The circuits are of different models"):
        compare_circuits(a, b)
    with pytest.raises(ValueError, match="needs n_layers and n_heads"):
        compare_circuits(Circuit(frozenset({head_node(0, 0)})), Circuit(frozenset()))


def unpruned_eap_graph() -> dict:
    """What EAP-IG (commit 795f560, src/eap/graph.py) writes after ``apply_topn(4, prune=False)``
    + ``to_json``: the top edges in the graph, nodes flagged only when they have an in-graph
    outgoing and incoming edge (input counts as having one), so a0.h1 (no incoming edge) is not."""
    data = eap_graph()
    for entry in data["edges"].values():
        entry["in_graph"] = False
    for name in ("input->a0.h0<q>", "a0.h0->logits", "a0.h1->a1.h0<k>", "a1.h0->logits"):
        data["edges"][name]["in_graph"] = True
    for name, entry in data["nodes"].items():
        entry["in_graph"] = name in ("input", "a0.h0", "a1.h0", "logits")
    return data


def test_eap_unpruned_file_is_read_as_written_or_as_eap_ig_prunes_it():
    data = unpruned_eap_graph()
    with pytest.warns(UserWarning, match="in-graph edges whose nodes are not in the graph"):
        circuit = Circuit.from_eap(data)
    assert len(circuit.edges) == 4 and head_node(0, 1) in circuit.nodes
    assert circuit.to_eap() == data  # a0.h1 stays unflagged, as EAP-IG wrote it
    # EAP-IG's prune: a0.h1 has no incoming edge, so it goes, then a1.h0 loses its only input
    pruned = Circuit.from_eap(data, prune=True)
    assert pruned.edges == {("embed", head_node(0, 0, "q")), (head_node(0, 0), "unembed")}
    assert pruned.nodes == {"embed", head_node(0, 0), "unembed"}


def test_eap_export_of_a_node_circuit_survives_eap_ig_pruning():
    circuit = Circuit(frozenset({head_node(1, 2), mlp_node(0)}), n_layers=L, n_heads=H)
    data = circuit.to_eap(d_model=16)
    assert {n for n, e in data["nodes"].items() if e["in_graph"]} == {
        "input",
        "m0",
        "a1.h2",
        "logits",
    }
    assert {n for n, e in data["edges"].items() if e["in_graph"]} == {
        "input->m0", "input->a1.h2<q>", "input->a1.h2<k>", "input->a1.h2<v>",
        "m0->a1.h2<q>", "m0->a1.h2<k>", "m0->a1.h2<v>",
        "input->logits", "m0->logits", "a1.h2->logits",
    }  # fmt: skip
    again = Circuit.from_eap(data, prune=True)  # what EAP-IG evaluates
    assert again.heads() == [(1, 2)] and again.mlps() == [0]


def test_auto_circuit_per_position_scores_error_names_the_head_count():
    per_position = {k: v.expand(5, *v.shape) for k, v in auto_circuit_scores().items()}
    with pytest.raises(
        ValueError,
        match=r"shape \(5, 3, 1\), expected \(3, 1\) for 2 layers x 3 heads; these are "
        r"per-position scores \(5 positions\)",
    ):
        Circuit.from_auto_circuit(per_position)
    with pytest.raises(ValueError, match="2 layers x 3 heads, not 4 x 3 as passed"):
        Circuit.from_auto_circuit(auto_circuit_scores(), n_layers=4)


def test_auto_circuit_edge_name_dict_knows_its_shape_and_exports():
    named = {"A0.1->A1.2.Q": 0.5, "Resid Start->MLP 0": 1.0, "MLP 1->Resid End": [3]}
    circuit = Circuit.from_auto_circuit(named)
    assert (circuit.n_layers, circuit.n_heads) == (2, 3)
    assert Circuit.from_auto_circuit(circuit.to_auto_circuit()).edges == circuit.edges
    bigger = Circuit.from_auto_circuit(named, n_layers=4, n_heads=8)
    assert (bigger.n_layers, bigger.n_heads) == (4, 8)
    assert bigger.to_auto_circuit()["blocks.3.hook_q_input"].shape == (8, 1 + 3 * 9)


def test_acdc_embedding_hooks_stay_apart():
    # tracr's get_true_edges (ACDC commit bc99ace) wires hook_embed and hook_pos_embed separately
    head = (None, None, 0)
    truth = {
        ("blocks.0.hook_q_input", head, "hook_embed", (None,)): True,
        ("blocks.0.hook_k_input", head, "hook_pos_embed", (None,)): True,
        ("blocks.0.hook_v_input", head, "hook_embed", (None,)): True,
        ("blocks.0.hook_v_input", head, "hook_pos_embed", (None,)): True,
        ("blocks.0.hook_mlp_in", (None,), "hook_pos_embed", (None,)): True,
        ("blocks.1.hook_resid_post", (None,), "blocks.0.attn.hook_result", head): True,
    }
    circuit = Circuit.from_acdc(truth, n_heads=H)
    assert circuit.to_acdc() == truth
    complete = circuit.to_acdc(complete=True)
    assert complete[("blocks.0.hook_k_input", head, "hook_embed", (None,))] is False
    assert Circuit.from_acdc(complete).to_acdc(complete=True) == complete


def test_acdc_true_edges_form_with_internal_edges(tmp_path):
    # get_ioi_true_edges (ACDC commit bc99ace): residual edges plus, for every head of the
    # circuit, hook_q/k/v_input -> hook_q/k/v and hook_q/k/v -> hook_result, and for every MLP
    # hook_mlp_in -> hook_mlp_out (1,131 keys = 963 + 78 + 90 for IOI)
    pre, none = "blocks.0.hook_resid_pre", (None,)
    residual = {
        ("blocks.0.hook_q_input", (None, None, 1), pre, none): True,
        ("blocks.0.hook_k_input", (None, None, 1), pre, none): True,
        ("blocks.0.hook_mlp_in", none, pre, none): True,
        ("blocks.1.hook_q_input", (None, None, 0), "blocks.0.attn.hook_result", (None, None, 1)): True,
        ("blocks.1.hook_resid_post", none, "blocks.1.attn.hook_result", (None, None, 0)): True,
        ("blocks.1.hook_resid_post", none, "blocks.0.hook_mlp_out", none): True,
    }  # fmt: skip
    internal = {}
    for layer, h in ((0, 1), (1, 0)):
        idx = (None, None, h)
        for x in "qkv":
            internal[
                (f"blocks.{layer}.attn.hook_{x}", idx, f"blocks.{layer}.hook_{x}_input", idx)
            ] = True
            internal[
                (f"blocks.{layer}.attn.hook_result", idx, f"blocks.{layer}.attn.hook_{x}", idx)
            ] = True
    internal[("blocks.0.hook_mlp_out", none, "blocks.0.hook_mlp_in", none)] = True  # fmt: skip
    truth = {**residual, **internal}
    read = Circuit.from_acdc(truth, n_heads=H)
    assert read.to_acdc() == truth
    plain = Circuit(read.nodes, read.edges, n_layers=L, n_heads=H)
    assert plain.to_acdc() == residual
    assert plain.to_acdc(internal=True) == truth
    # a form with only the *_input -> hook_q/k/v internal edges (docstring's) comes back as it was
    partial = {k: v for k, v in truth.items() if "hook_result" not in k[0] or "input" in k[2]}
    partial = {k: v for k, v in partial.items() if not k[0].endswith("mlp_out") or "in" not in k[2]}
    assert Circuit.from_acdc(partial, n_heads=H).to_acdc() == partial
    path = tmp_path / "c.json"
    read.save(path)
    assert Circuit.load(path).to_acdc() == truth


def test_acdc_complete_attention_only_graph():
    gen = torch.Generator().manual_seed(5)
    universe = circuit_formats.all_edges(L, H, attn_only=True)
    chosen = [e for e in universe if torch.rand((), generator=gen) < 0.3]
    circuit = Circuit(frozenset(), frozenset(chosen), n_layers=L, n_heads=H)
    complete = circuit.to_acdc(complete=True, attn_only=True)
    assert not any("mlp" in k[0] or "mlp" in k[2] for k in complete)
    assert len(complete) == len(universe) + 2 * 3 * L * H
    again = Circuit.from_acdc(complete)  # recognised as attention-only, n_heads inferred
    assert again.n_heads == H and again.metadata["acdc_attn_only"] is True
    assert again.to_acdc(complete=True) == complete
    with pytest.raises(ValueError, match=r"attn_only=True, but the circuit has MLPs \[0\]"):
        Circuit(frozenset({mlp_node(0)}), n_layers=L, n_heads=H).to_acdc(
            complete=True, attn_only=True
        )


def test_acdc_complete_export_keeps_the_internal_edges_it_read():
    circuit = Circuit(
        frozenset(), frozenset({("embed", head_node(1, 0, "q"))}), n_layers=L, n_heads=H
    )
    complete = circuit.to_acdc(complete=True)
    idx = (None, None, 2)  # head 0.2 is in no residual edge, but ACDC kept its internal edge
    key = ("blocks.0.attn.hook_q", idx, "blocks.0.hook_q_input", idx)
    assert complete[key] is False
    complete[key] = True
    assert Circuit.from_acdc(complete, n_heads=H).to_acdc(complete=True) == complete
