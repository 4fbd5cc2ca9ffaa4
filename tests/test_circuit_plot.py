"""plot_circuit: the layered graph draws exactly the edges asked for, from every kind of input
(edge scores, circuits with or without edges, circuits read from EAP-IG and ACDC files), and
writes SVG, PNG and self-contained HTML."""

from __future__ import annotations

import json
import re

import pytest
import torch

from subnet_interp.analysis import (
    Circuit,
    CircuitPlot,
    graph_edge_scores,
    head_node,
    mlp_node,
    node_of,
    plot_circuit,
)

L, H = 2, 3


def eap_file(tmp_path) -> str:
    """A small EAP-IG ``Graph.to_json`` file in EAP-IG's own names: every edge scored, five of
    them in the graph (one into each of a head's q, k and v)."""
    parents = ["input"] + [f"a0.h{h}" for h in range(H)] + ["m0"]
    edges = {}
    for x in "qkv":
        for h in range(H):
            edges.update({f"{p}->a1.h{h}<{x}>": None for p in parents})
    edges.update({f"{p}->m0": None for p in ["input"] + [f"a0.h{h}" for h in range(H)]})
    edges.update({f"{p}->m1": None for p in parents + [f"a1.h{h}" for h in range(H)]})
    edges.update({f"{p}->logits": None for p in parents + [f"a1.h{h}" for h in range(H)] + ["m1"]})
    chosen = {"a0.h1->a1.h2<q>", "m0->a1.h2<k>", "input->a1.h0<v>", "a1.h2->logits", "m1->logits"}
    chosen |= {"a1.h0->m1", "input->m0", "a0.h1->m0", "input->a0.h1<q>"}
    gen = torch.Generator().manual_seed(0)
    scored = {
        name: {"score": float(torch.randn((), generator=gen)), "in_graph": name in chosen}
        for name in edges
        if "a0.h1<q>" not in name
    }
    scored["input->a0.h1<q>"] = {"score": 0.5, "in_graph": True}
    for p in ["input"]:
        for h in range(H):
            for x in "qkv":
                scored.setdefault(f"{p}->a0.h{h}<{x}>", {"score": 0.0, "in_graph": False})
    names = {n for e in chosen for n in e.split("<")[0].split("->")}
    nodes = {n: {"in_graph": n in names} for n in parents + [f"a1.h{h}" for h in range(H)]}
    nodes.update({"m1": {"in_graph": True}, "logits": {"in_graph": True}})
    path = tmp_path / "eap.json"
    cfg = {"n_layers": L, "n_heads": H, "parallel_attn_mlp": False}
    path.write_text(json.dumps({"cfg": cfg, "nodes": nodes, "edges": scored}))
    return str(path)


def typed(match: str) -> str:
    """``match``, or the test suite's runtime type checker's message (see conftest.py), which
    may reject a value of the wrong type before plot_circuit's own check runs."""
    return rf"(?s)(?:{match})|(?:Type-check error whilst checking .*circuit_or_edge_scores)"


def svg_edges(svg: str) -> set[tuple[str, str]]:
    return set(re.findall(r'<path class="edge"[^>]* data-src="([^"]+)" data-dst="([^"]+)"', svg))


def svg_nodes(svg: str) -> set[str]:
    return set(re.findall(r'<g class="node" data-name="([^"]+)"', svg))


def test_top_k_draws_the_largest_edge_scores():
    from _hf_models import gpt2

    pytest.importorskip("transformers")
    scores = graph_edge_scores(gpt2(), None)
    plot = plot_circuit(scores, top_k=12)
    best = sorted(scores, key=lambda e: -abs(scores[e]))[:12]
    assert set(plot.edges) == set(best) and svg_edges(plot.svg) == set(best)
    assert svg_nodes(plot.svg) == {node_of(x) for e in best for x in e}
    assert isinstance(plot, CircuitPlot) and plot._repr_svg_() == plot.svg


def test_a_circuit_read_from_an_eap_ig_file(tmp_path):
    circuit = Circuit.load(eap_file(tmp_path))
    plot = plot_circuit(circuit, path=tmp_path / "c.html")
    assert svg_edges(plot.svg) == set(circuit.edges) and len(circuit.edges) == 9
    assert {"embed", "unembed", head_node(1, 2), mlp_node(0)} <= svg_nodes(plot.svg)
    assert plot.edges[("embed", head_node(0, 1, "q"))] == 0.5
    # the port an edge enters: q solid, k dashed, v dotted
    k_edge = re.search(r'<path class="edge"[^>]*data-dst="blocks.1.attn.head.2.k"', plot.svg)
    assert 'stroke-dasharray="5,3"' in k_edge.group(0)
    page = (tmp_path / "c.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page
    # nothing is fetched: the only URL is the SVG namespace
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(?!data:)", page)
    top = plot_circuit(circuit, top_k=3)
    assert len(top.edges) == 3 and min(abs(s) for s in top.edges.values()) >= max(
        abs(circuit.edge_scores[e]) for e in set(circuit.edges) - set(top.edges)
    )


def test_a_circuit_read_from_acdc_edges():
    acdc = {
        (
            "blocks.1.hook_q_input",
            (None, None, 0),
            "blocks.0.attn.hook_result",
            (None, None, 2),
        ): 0.3,
        ("blocks.1.hook_k_input", (None, None, 1), "blocks.0.hook_mlp_out", (None,)): -0.2,
        ("blocks.1.hook_resid_post", (None,), "blocks.1.attn.hook_result", (None, None, 0)): 0.1,
    }
    circuit = Circuit.from_acdc(acdc, n_heads=H)
    plot = plot_circuit(circuit)
    assert svg_edges(plot.svg) == set(circuit.edges) and len(plot.edges) == 3
    # a negative score: a diverging scale, blue below zero
    assert 'stop-color="#2166ac"' in plot.svg


def test_nodes_only_and_all_nodes():
    circuit = Circuit(
        frozenset({head_node(0, 1), head_node(1, 2), mlp_node(0)}),
        node_scores={head_node(0, 1): 0.9, head_node(1, 2): 0.1},
        n_layers=L,
        n_heads=H,
    )
    plot = plot_circuit(circuit)
    assert not plot.edges and svg_nodes(plot.svg) == set(circuit.nodes)
    fills = dict(
        re.findall(r'(?s)data-name="([^"]+)"[^>]*>.*?<rect [^>]*fill="(#[0-9a-f]+)"', plot.svg)
    )
    assert fills[head_node(0, 1)] == "#fde725" and fills[head_node(1, 2)] == "#440154"  # viridis
    everything = plot_circuit(circuit, all_nodes=True)
    assert len(everything.nodes) == 2 + L * (H + 1)
    assert everything.nodes[:3] == tuple(sorted(circuit.nodes, key=lambda n: (n[7], n)))
    assert everything.svg.count('data-in-circuit="0"') == 2 + L * (H + 1) - 3


def test_threshold_is_on_the_absolute_score_and_files_by_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    scores = {
        ("embed", head_node(0, 0, "q")): 0.9,
        (head_node(0, 0), mlp_node(0)): -0.6,
        (mlp_node(0), "unembed"): 0.1,
        (head_node(0, 0), "unembed"): float("nan"),
    }
    plot = plot_circuit(scores, threshold=0.5)
    assert set(plot.edges) == {("embed", head_node(0, 0, "q")), (head_node(0, 0), mlp_node(0))}
    assert len(plot_circuit(scores).edges) == 3  # nan is no edge
    for suffix in ("svg", "png", "html"):
        plot.save(tmp_path / f"c.{suffix}")
    assert (tmp_path / "c.svg").read_text() == plot.svg
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"\.svg, \.png or \.html.*'c.pdf'"):
        plot.save("c.pdf")


def test_bad_input_says_what_to_do():
    scores = {("embed", head_node(0, 0, "q")): 0.9}
    with pytest.raises(ValueError, match="at most one of top_k= and threshold="):
        plot_circuit(scores, top_k=1, threshold=0.5)
    with pytest.raises(ValueError, match="top_k=5 but only 1"):
        plot_circuit(scores, top_k=5)
    with pytest.raises(ValueError, match="none of the circuit's 1 edges has a score"):
        plot_circuit(Circuit(frozenset(), frozenset({("embed", "unembed")})), top_k=1)
    with pytest.raises(TypeError, match=typed("Circuit or a dict of edge scores.*got list")):
        plot_circuit([("embed", "unembed")])
    with pytest.raises((ValueError, TypeError), match=typed("name pairs, got key 'embed'")):
        plot_circuit({"embed": 1.0})
    with pytest.raises(Exception, match="Unknown circuit node name"):
        plot_circuit({("embed", "blocks.0.attn.W_Q"): 1.0})
    many = {("embed", head_node(1, h % 50, "qkv"[h // 50])): float(h) for h in range(150)}
    many |= {(head_node(0, h), mlp_node(0)): 1.0 for h in range(200)}
    with pytest.raises(ValueError, match="350 scored edges are too many.*top_k="):
        plot_circuit(many)
    assert len(plot_circuit(many, top_k=7).edges) == 7
