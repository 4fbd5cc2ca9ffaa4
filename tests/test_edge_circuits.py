"""Circuit.from_edge_scores: the strongest scored edges as an exportable circuit."""

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import Circuit, edge_kind, graph_edge_scores, head_node, mlp_node

H00, H01, H10, H11 = head_node(0, 0), head_node(0, 1), head_node(1, 0), head_node(1, 1)
SCORES = {
    (H00, f"{H10}.k"): 0.9,
    (H01, f"{H11}.q"): 0.5,
    (H00, f"{H11}.v"): 0.5,  # tie with the edge before: that one ranks first
    (H00, mlp_node(0)): 0.4,
    (mlp_node(0), f"{H10}.v"): 0.2,
    (H01, mlp_node(1)): float("nan"),
}


def test_top_k_keeps_exactly_k_with_ties_in_key_order():
    circuit = Circuit.from_edge_scores(SCORES, top_k=2, connect=False)
    assert circuit.edges == {(H00, f"{H10}.k"), (H01, f"{H11}.q")}
    assert circuit.edge_scores == {(H00, f"{H10}.k"): 0.9, (H01, f"{H11}.q"): 0.5}
    assert circuit.nodes == {H00, H10, H01, H11}
    for k in range(6):
        assert len(Circuit.from_edge_scores(SCORES, top_k=k, connect=False).edges) == k


def test_threshold_keeps_scores_at_least_it_and_never_nan():
    circuit = Circuit.from_edge_scores(SCORES, threshold=0.4, connect=False)
    assert set(circuit.edges) == {e for e, v in SCORES.items() if v >= 0.4}
    assert len(Circuit.from_edge_scores(SCORES, threshold=-1.0, connect=False).edges) == 5
    assert Circuit.from_edge_scores(SCORES, threshold=2.0).edges == frozenset()


def test_kinds_and_per_kind():
    assert edge_kind((H00, f"{H10}.k")) == "head->k"
    assert edge_kind((mlp_node(0), mlp_node(1))) == "mlp->mlp"
    assert edge_kind(("embed", H10)) == "embed->head"
    assert edge_kind((H10, "unembed")) == "head->unembed"
    only_v = Circuit.from_edge_scores(SCORES, top_k=2, kinds=["head->v", "mlp->v"], connect=False)
    assert only_v.edges == {(H00, f"{H11}.v"), (mlp_node(0), f"{H10}.v")}
    each = Circuit.from_edge_scores(SCORES, top_k=1, per_kind=True, connect=False)
    assert {edge_kind(e) for e in each.edges} == {edge_kind(e) for e in SCORES}
    assert len(each.edges) == len({edge_kind(e) for e in SCORES})


def test_errors_name_what_was_given_and_the_fix():
    with pytest.raises(ValueError, match="exactly one of top_k.*top_k=None, threshold=None"):
        Circuit.from_edge_scores(SCORES)
    with pytest.raises(ValueError, match="top_k=2, threshold=0.5"):
        Circuit.from_edge_scores(SCORES, top_k=2, threshold=0.5)
    with pytest.raises(ValueError, match="only 5 scored edges.*top_k <= 5"):
        Circuit.from_edge_scores(SCORES, top_k=6)
    with pytest.raises(ValueError, match="non-negative int"):
        Circuit.from_edge_scores(SCORES, top_k=-1)
    with pytest.raises(ValueError, match="per_kind=True.*top_k"):
        Circuit.from_edge_scores(SCORES, threshold=0.1, per_kind=True)
    with pytest.raises(ValueError, match="only 1 edges of kind 'head->k'"):
        Circuit.from_edge_scores(SCORES, top_k=2, per_kind=True)
    with pytest.raises(ValueError, match=r"kinds \['mlp->q'\] are not among"):
        Circuit.from_edge_scores(SCORES, top_k=1, kinds=["mlp->q"])
    with pytest.raises(ValueError, match="No edge scores"):
        Circuit.from_edge_scores({}, top_k=1)
    with pytest.raises(ValueError, match="no circuit node name"):
        Circuit.from_edge_scores({("a0.h1", "m1"): 1.0}, top_k=1)


def test_shape_is_inferred_from_all_scored_names_or_given():
    circuit = Circuit.from_edge_scores(SCORES, top_k=1)
    assert (circuit.n_layers, circuit.n_heads) == (2, 2)
    wider = Circuit.from_edge_scores(SCORES, top_k=1, n_layers=3, n_heads=4)
    assert (wider.n_layers, wider.n_heads) == (3, 4)
    with pytest.raises(si.NotFoundError):
        Circuit.from_edge_scores(SCORES, top_k=1, n_heads=1)


def test_connect_adds_unscored_embed_and_unembed_edges():
    circuit = Circuit.from_edge_scores(SCORES, top_k=2)
    added = circuit.edges - set(circuit.edge_scores)
    assert added == {
        ("embed", f"{H00}.q"),
        ("embed", f"{H00}.k"),
        ("embed", f"{H00}.v"),
        ("embed", f"{H01}.q"),
        ("embed", f"{H01}.k"),
        ("embed", f"{H01}.v"),
        (H10, "unembed"),
        (H11, "unembed"),
    }
    assert {"embed", "unembed"} <= circuit.nodes
    # a node with both kept in- and out-edges gets neither; an MLP is fed without a port
    chain = Circuit.from_edge_scores(
        {(H00, mlp_node(0)): 1.0, (mlp_node(0), f"{H10}.v"): 1.0}, top_k=2
    )
    assert chain.edges - set(chain.edge_scores) == {
        ("embed", f"{H00}.q"),
        ("embed", f"{H00}.k"),
        ("embed", f"{H00}.v"),
        (H10, "unembed"),
    }


def _reachable(circuit):
    """Nodes on a path embed -> ... -> unembed (what EAP-IG's Graph.prune keeps)."""
    from subnet_interp.analysis import node_of

    edges = [(s, node_of(d)) for s, d in circuit.edges]
    forward, backward = {"embed"}, {"unembed"}
    for _ in range(len(circuit.nodes)):
        forward |= {d for s, d in edges if s in forward}
        backward |= {s for s, d in edges if d in backward}
    return forward & backward


@pytest.mark.parametrize("connect", [True, False])
def test_round_trips_through_eap_and_acdc(connect):
    circuit = Circuit.from_edge_scores(SCORES, top_k=3, connect=connect)
    again = Circuit.from_eap(circuit.to_eap(d_model=8))
    assert again.edges == circuit.edges
    assert again.nodes == circuit.nodes | {"unembed"}  # to_eap always keeps the logits node
    assert {e: again.edge_scores[e] for e in circuit.edge_scores} == circuit.edge_scores
    assert Circuit.from_acdc(circuit.to_acdc()).edges == circuit.edges
    inner = circuit.nodes - {"embed", "unembed"}
    if connect:  # every node survives EAP-IG's pruning
        assert inner <= _reachable(again)
    else:
        assert not inner & _reachable(again)


def test_on_a_tiny_gpt2_with_real_graph_edge_scores():
    from subnet_interp.tasks.induction import tiny_gpt2

    model = tiny_gpt2(n_layer=2, n_head=4, d_model=32)
    gen = torch.Generator().manual_seed(0)
    sub = si.Subnetwork(
        {n: torch.rand(t.shape, generator=gen) < 0.3 for n, t in si.targets(model).items()}
    )
    scores = graph_edge_scores(model, sub)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    circuit = Circuit.from_edge_scores(scores, top_k=10)
    assert (circuit.n_layers, circuit.n_heads) == (2, 4)
    assert len(circuit.edge_scores) == 10
    assert min(circuit.edge_scores.values()) >= sorted(scores.values())[-10]
    cut = sorted(scores.values())[-10]
    assert set(Circuit.from_edge_scores(scores, threshold=cut, connect=False).edges) == {
        e for e, v in scores.items() if v >= cut
    }
    again = Circuit.from_eap(circuit.to_eap(d_model=32))
    assert again.edges == circuit.edges
    assert circuit.nodes - {"embed", "unembed"} <= _reachable(again)
    per_kind = Circuit.from_edge_scores(scores, top_k=1, per_kind=True, connect=False)
    assert len(per_kind.edges) == 8  # head->q/k/v/mlp, mlp->q/k/v/mlp


def test_a_threshold_that_is_not_a_number_is_refused():
    with pytest.raises((TypeError, ValueError), match="threshold"):
        Circuit.from_edge_scores(SCORES, threshold="high")


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_attention_and_mlp_blocks_have_no_head_to_own_mlp_edges(parallel):
    """GPT-NeoX with use_parallel_residual: MLP L reads the block's input, so no head of block
    L feeds it; the scores' edges are the parallel graph's, and its circuits export as one."""
    import transformers

    from subnet_interp.analysis import is_parallel_attn_mlp
    from subnet_interp.analysis.circuits import all_edges

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
        vocab_size=20, use_parallel_residual=parallel,
    )  # fmt: skip
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    assert is_parallel_attn_mlp(model) is parallel
    scores = graph_edge_scores(model, None)
    inner = {
        e
        for e in all_edges(2, 4, parallel_attn_mlp=parallel)
        if "embed" not in e[0] and e[1] != "unembed"
    }
    assert set(scores) == inner
    assert ((head_node(0, 1), mlp_node(0)) in scores) is not parallel
    assert (head_node(0, 1), mlp_node(1)) in scores
    circuit = Circuit.from_edge_scores(scores, top_k=6)
    circuit.to_auto_circuit(parallel_attn_mlp=parallel)
    eap = circuit.to_eap(d_model=32, parallel_attn_mlp=is_parallel_attn_mlp(model))
    assert eap["cfg"]["parallel_attn_mlp"] is parallel
    assert Circuit.from_eap(eap).edges == circuit.edges
