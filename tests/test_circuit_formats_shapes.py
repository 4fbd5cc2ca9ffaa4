"""Round trips per model shape (GPT-2, attention-only, GPT-NeoX / Pythia parallel blocks, Llama
with grouped-query attention) for every format, from the tools' own structures as
``_tool_graphs`` builds them (versions named there: EAP-IG 795f560, ACDC bc99ace, auto-circuit
1.0.1). Import -> export gives back the identical object: every key, flag and score, in the
tools' own order."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _tool_graphs import (
    PLACEHOLDER,
    SHAPES,
    Shape,
    acdc_graph,
    after_acdc_run,
    auto_circuit_prune_scores,
    eap_ig_edges,
    eap_ig_json,
    is_internal,
    save_subgraph,
)

from subnet_interp.analysis import Circuit, head_node, mlp_node

ids = [shape.name for shape in SHAPES]


# ---- EAP-IG / MIB: EAP-IG commit 795f560 ---------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_eap_ig_json_round_trips_to_the_same_text(shape, tmp_path):
    data = eap_ig_json(shape, n_top=len(eap_ig_edges(shape)) // 2, seed=1)
    in_graph = {k for k, v in data["edges"].items() if v["in_graph"]}
    circuit = Circuit.from_eap(data)
    assert len(circuit.edges) == len(in_graph) > 0
    assert len(circuit.edge_scores) == len(data["edges"])
    assert (circuit.n_layers, circuit.n_heads) == (shape.n_layers, shape.n_heads)
    assert json.dumps(circuit.to_eap()) == json.dumps(data)  # same keys, values and order
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(data))
    circuit.to_eap(tmp_path / "out.json")
    assert (tmp_path / "out.json").read_text() == path.read_text()


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_eap_ig_graph_of_a_new_circuit_is_eap_ig_s_graph(shape):
    # GQA: EAP-IG's cfg has no n_key_value_heads; every head has its own k and v input edges
    cfg = {"parallel_attn_mlp": shape.parallel_attn_mlp}
    blank = Circuit(
        frozenset(), n_layers=shape.n_layers, n_heads=shape.n_heads, metadata={"eap_cfg": cfg}
    )
    data = blank.to_eap(d_model=shape.d_model)
    assert list(data["edges"]) == eap_ig_edges(shape)
    assert list(data["nodes"]) == list(eap_ig_json(shape, 1, 0)["nodes"])
    assert data["cfg"] == eap_ig_json(shape, 1, 0)["cfg"]


def test_eap_ig_graph_sizes_of_real_models():
    # the sizes Graph.from_model gives (shared/notes/interop.md), so the order above is its own:
    # GPT-2 small 32,491 edges, Llama-3.2-1B (16 layers x 32 heads, 8 K/V heads) 386,713,
    # Qwen2.5-0.5B (24 x 14, 2 K/V heads) 179,749, Pythia-70m (6 x 8, parallel) 3,580
    assert len(eap_ig_edges(Shape("gpt2_small", 12, 12))) == 32_491
    assert len(eap_ig_edges(Shape("llama_1b", 16, 32, n_key_value_heads=8))) == 386_713
    assert len(eap_ig_edges(Shape("qwen_05b", 24, 14, n_key_value_heads=2))) == 179_749
    assert len(eap_ig_edges(Shape("pythia_70m", 6, 8, parallel_attn_mlp=True))) == 3_580


# ---- ACDC: commit bc99ace --------------------------------------------------------------------
@pytest.mark.parametrize("use_pos_embed", [False, True], ids=["resid_pre", "pos_embed"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_acdc_save_subgraph_round_trips(shape, use_pos_embed):
    saved = save_subgraph(shape, seed=2, use_pos_embed=use_pos_embed)
    circuit = Circuit.from_acdc(saved)  # the complete graph tells n_layers, n_heads, attn_only
    assert (circuit.n_layers, circuit.n_heads) == (shape.n_layers, shape.n_heads)
    residual = {k for k, v in saved.items() if v and not is_internal(k)}
    if use_pos_embed:  # some edges are fed by only one of the two embeddings
        assert any(
            k[2] == "hook_embed" and (*k[:2], "hook_pos_embed", (None,)) not in residual
            for k in residual
        )
    assert circuit.metadata.get("acdc_attn_only", False) is shape.attn_only
    assert circuit.to_acdc(complete=True) == saved  # OrderedDicts: keys, flags and order


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_acdc_graph_after_a_run_round_trips(shape):
    # after a run every key left is present; internal edges of pruned heads stay
    saved = after_acdc_run(shape, seed=3, use_pos_embed=True)
    circuit = Circuit.from_acdc(saved, n_heads=shape.n_heads)
    embed = lambda hook: "embed" if hook in ("hook_embed", "hook_pos_embed") else hook  # noqa: E731
    residual = {(c, ci, embed(p), pi) for c, ci, p, pi in saved if not is_internal((c, ci, p, pi))}
    assert len(circuit.edges) == len(residual)
    assert circuit.to_acdc() == saved
    assert Circuit.from_acdc(circuit.to_acdc(), n_heads=shape.n_heads) == circuit


@pytest.mark.parametrize("use_pos_embed", [False, True], ids=["resid_pre", "pos_embed"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_acdc_complete_graph_of_a_new_circuit_has_load_subgraph_s_keys(shape, use_pos_embed):
    # load_subgraph asserts the dict holds exactly setup_from_model's keys
    graph = acdc_graph(shape, use_pos_embed)
    edges = frozenset({("embed", head_node(1, 2, "k")), (head_node(0, 1), "unembed")})
    circuit = Circuit(frozenset(), edges, n_layers=shape.n_layers, n_heads=shape.n_heads)
    out = circuit.to_acdc(complete=True, attn_only=shape.attn_only, use_pos_embed=use_pos_embed)
    assert list(out) == list(graph)
    present = {k for k, v in out.items() if v and graph[k] != PLACEHOLDER}
    assert len([k for k in present if not is_internal(k)]) == 2 + use_pos_embed
    assert Circuit.from_acdc(out).edges == edges


def test_acdc_graph_sizes():
    # setup_from_model of GPT-2 small: 33,367 keys (32,491 residual + 876 internal)
    assert len(acdc_graph(Shape("gpt2_small", 12, 12))) == 33_367
    assert len(acdc_graph(Shape("attn_only_4", 4, 8, attn_only=True))) == 1_281 + 4 * 8 * 6


# ---- auto-circuit 1.0.1 --------------------------------------------------------------------
@pytest.mark.parametrize("separate_qkv", [True, False], ids=["qkv", "attn_in"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_auto_circuit_prune_scores_round_trip(shape, separate_qkv):
    scores = auto_circuit_prune_scores(shape, seed=4, separate_qkv=separate_qkv)
    circuit = Circuit.from_auto_circuit(scores)
    assert (circuit.n_layers, circuit.n_heads) == (shape.n_layers, shape.n_heads)
    assert len(circuit.edges) == sum(int((t != 0).sum()) for t in scores.values())
    assert len(circuit.edge_scores) == sum(t.numel() for t in scores.values())
    back = circuit.to_auto_circuit()
    assert back.keys() == scores.keys()
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], scores[k]) for k in scores)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_auto_circuit_shapes_of_a_new_circuit(shape):
    blank = Circuit(frozenset(), n_layers=shape.n_layers, n_heads=shape.n_heads)
    out = blank.to_auto_circuit(
        parallel_attn_mlp=shape.parallel_attn_mlp, attn_only=shape.attn_only
    )
    expected = auto_circuit_prune_scores(shape, seed=0)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in expected.items()}
    with pytest.raises(ValueError, match=r"attn_only=True, but the circuit has MLPs \[1\]"):
        Circuit(frozenset({mlp_node(1)}), n_layers=3, n_heads=4).to_auto_circuit(attn_only=True)


def test_auto_circuit_attention_only_size():
    # PruneScores of a 4-layer attention-only model with 8 heads: 1,281 edges
    blank = Circuit(frozenset(), n_layers=4, n_heads=8)
    assert sum(t.numel() for t in blank.to_auto_circuit(attn_only=True).values()) == 1_281


def test_acdc_edge_into_the_own_layer_mlp_has_no_place_in_a_parallel_graph():
    # setup_from_model ignores parallel_attn_mlp: a NeoX model's ACDC graph has head -> own MLP
    head, none = (None, None, 0), (None,)
    saved = {
        ("blocks.1.hook_mlp_in", none, "blocks.1.attn.hook_result", head): True,
        ("blocks.2.hook_resid_post", none, "blocks.1.hook_mlp_out", none): True,
    }
    circuit = Circuit.from_acdc(saved, n_heads=4)
    assert circuit.to_acdc() == saved
    assert circuit.to_auto_circuit()["blocks.1.hook_mlp_in"][1 + 4 + 1 + 0] == 1.0
    with pytest.raises(ValueError, match="does not run forward"):
        circuit.to_auto_circuit(parallel_attn_mlp=True)
    parallel = dataclasses.replace(circuit, metadata={"eap_cfg": {"parallel_attn_mlp": True}})
    with pytest.raises(ValueError, match="are not edges of EAP-IG's graph"):
        parallel.to_eap(d_model=16)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_own_json_keeps_what_each_tool_s_export_needs(shape, tmp_path):
    path = tmp_path / "circuit.json"
    eap = eap_ig_json(shape, n_top=len(eap_ig_edges(shape)) // 2, seed=5)
    Circuit.from_eap(eap).save(path)
    assert json.dumps(Circuit.load(path).to_eap()) == json.dumps(eap)
    acdc = save_subgraph(shape, seed=6, use_pos_embed=True)
    Circuit.from_acdc(acdc).save(path)
    assert Circuit.load(path).to_acdc(complete=True) == acdc
    scores = auto_circuit_prune_scores(shape, seed=7)
    Circuit.from_auto_circuit(scores).save(path)
    back = Circuit.load(path).to_auto_circuit()
    assert back.keys() == scores.keys() and all(torch.equal(back[k], scores[k]) for k in scores)
