"""Against the circuit tools' own code, where it is importable: EAP-IG (``eap.graph``), ACDC
(``acdc.TLACDCCorrespondence``, ``acdc.ioi.utils``, ``acdc.greaterthan.utils``) and auto-circuit
(``auto_circuit.model_utils.transformer_lens_utils``). None of them is a dependency and all
three import TransformerLens 3's ``HookedTransformer``, so with TransformerLens 4 (this
project's) each test skips. Where they run, they show that ``_tool_graphs`` (which the other
format tests use) builds what the tools build, and that our exports are what the tools read."""

from __future__ import annotations

import importlib
import json
import types
import warnings

import pytest
import torch
from _tool_graphs import (
    PLACEHOLDER,
    SHAPES,
    Shape,
    acdc_graph,
    auto_circuit_prune_scores,
    eap_ig_edges,
    eap_ig_json,
    greaterthan_true_edges,
    ioi_true_edges,
)

from subnet_interp.analysis import Circuit

ids = [shape.name for shape in SHAPES]


def tool(module: str) -> types.ModuleType:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as error:  # not installed, or not importable beside TransformerLens 4
        pytest.skip(f"{module} is not importable here ({type(error).__name__}: {error})")


def fake_model(shape: Shape) -> types.SimpleNamespace:
    """What the tools read of a ``HookedTransformer`` to build their graphs: its config."""
    cfg = types.SimpleNamespace(
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        n_key_value_heads=shape.n_key_value_heads,
        attn_only=shape.attn_only,
        parallel_attn_mlp=shape.parallel_attn_mlp,
        d_model=shape.d_model,
        use_attn_result=True,
        use_hook_mlp_in=True,
        use_split_qkv_input=True,
        use_attn_in=True,
    )
    return types.SimpleNamespace(cfg=cfg)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_eap_ig_graph_and_files(shape, tmp_path):
    graph_module = tool("eap.graph")
    cfg = {k: getattr(fake_model(shape).cfg, k) for k in ("n_layers", "n_heads", "d_model")}
    cfg["parallel_attn_mlp"] = shape.parallel_attn_mlp
    graph = graph_module.Graph.from_model(cfg)
    assert list(graph.edges) == eap_ig_edges(shape)
    ours = eap_ig_json(shape, n_top=len(graph.edges) // 2, seed=1)
    for name, entry in ours["edges"].items():
        graph.edges[name].score = entry["score"]
    graph.apply_topn(len(graph.edges) // 2)
    graph.to_json(str(tmp_path / "eap.json"))
    text = (tmp_path / "eap.json").read_text()
    assert json.loads(text) == ours  # the helper writes what EAP-IG writes
    Circuit.from_eap(json.loads(text)).to_eap(tmp_path / "ours.json")
    assert (tmp_path / "ours.json").read_text() == text
    again = graph_module.Graph.from_json(str(tmp_path / "ours.json"))
    real = graph.real_edge_mask
    assert torch.equal(again.in_graph, graph.in_graph)
    assert torch.equal(again.scores[real], graph.scores[real])


@pytest.mark.parametrize("use_pos_embed", [False, True], ids=["resid_pre", "pos_embed"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_acdc_correspondence(shape, use_pos_embed):
    correspondence = tool("acdc.TLACDCCorrespondence").TLACDCCorrespondence
    edge_type = tool("acdc.TLACDCEdge").EdgeType
    corr = correspondence.setup_from_model(fake_model(shape), use_pos_embed=use_pos_embed)
    real = {
        (c, ci.hashable_tuple, p, pi.hashable_tuple): edge.edge_type
        for (c, ci, p, pi), edge in corr.all_edges().items()
    }
    ours = acdc_graph(shape, use_pos_embed)
    assert list(real) == list(ours)
    assert all((real[k] == edge_type.PLACEHOLDER) == (v == PLACEHOLDER) for k, v in ours.items())
    blank = Circuit(frozenset(), n_layers=shape.n_layers, n_heads=shape.n_heads)
    out = blank.to_acdc(complete=True, attn_only=shape.attn_only, use_pos_embed=use_pos_embed)
    assert list(out) == list(real)


def test_acdc_ground_truths():
    ioi = tool("acdc.ioi.utils").get_ioi_true_edges(fake_model(Shape("gpt2", 12, 12)))
    greaterthan = tool("acdc.greaterthan.utils").get_greaterthan_true_edges(
        fake_model(Shape("gpt2", 12, 12))
    )
    for real, ours in ((ioi, ioi_true_edges()), (greaterthan, greaterthan_true_edges())):
        assert list(real.items()) == list(ours.items())
        assert Circuit.from_acdc(real, n_heads=12).to_acdc() == real


@pytest.mark.parametrize("separate_qkv", [True, False], ids=["qkv", "attn_in"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_auto_circuit_prune_score_shapes(shape, separate_qkv):
    utils = tool("auto_circuit.model_utils.transformer_lens_utils")
    model = fake_model(shape)
    srcs = utils.factorized_src_nodes(model)
    dests = utils.factorized_dest_nodes(model, separate_qkv)
    # make_model_patchable: per destination module [its destinations, sources of lower layer]
    shapes: dict[str, tuple[int, ...]] = {}
    for module in {d.module_name for d in dests}:
        nodes = [d for d in dests if d.module_name == module]
        n_src = sum(s.layer < nodes[0].layer for s in srcs)
        shapes[module] = (len(nodes), n_src) if nodes[0].head_dim is not None else (n_src,)
    ours = auto_circuit_prune_scores(shape, seed=0, separate_qkv=separate_qkv)
    assert {k: tuple(v.shape) for k, v in ours.items()} == shapes
    order = [s.name for s in sorted(srcs, key=lambda s: s.src_idx)]
    blank = Circuit(frozenset(), n_layers=shape.n_layers, n_heads=shape.n_heads)
    flat = blank.to_auto_circuit(attn_only=shape.attn_only)[
        f"blocks.{shape.n_layers - 1}.hook_resid_post"
    ]
    assert len(order) == flat.numel() and order[0] == "Resid Start"
    assert order[1 : 1 + shape.n_heads] == [f"A0.{h}" for h in range(shape.n_heads)]
