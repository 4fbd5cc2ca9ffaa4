"""EAP / EAP-IG and MIB graphs (``Graph.to_json`` of hannamw/EAP-IG): ``from_eap``, ``to_eap``."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..circuits import (
    EMBED,
    UNEMBED,
    Circuit,
    head_node,
    mlp_node,
    need_shape,
    node_of,
    node_position,
    sources,
)
from .files import read_json, write_atomically

_EAP_NODE = re.compile(r"^(?:(input)|(logits)|a(\d+)\.h(\d+)|m(\d+))$")
_EAP_EDGE = re.compile(r"^(.+)->(.+?)(?:<([qkv])>)?$")


def _from_eap_node(name: str) -> str:
    match = _EAP_NODE.match(name)
    if match is None:
        raise ValueError(
            f"Unknown EAP-IG node name {name!r}; expected 'input', 'a<L>.h<H>', 'm<L>' or 'logits'."
        )
    if match.group(1):
        return EMBED
    if match.group(2):
        return UNEMBED
    if match.group(3) is not None:
        return head_node(int(match.group(3)), int(match.group(4)))
    return mlp_node(int(match.group(5)))


def _to_eap_node(node: str) -> str:
    if node == EMBED:
        return "input"
    if node == UNEMBED:
        return "logits"
    layer, head = node_position(node)
    return f"m{layer}" if head is None else f"a{layer}.h{head}"


def _from_eap_edge(name: str) -> tuple[str, str]:
    match = _EAP_EDGE.match(name)
    if match is None:
        raise ValueError(f"Unknown EAP-IG edge name {name!r}; expected 'parent->child[<q|k|v>]'.")
    src, dst, port = _from_eap_node(match.group(1)), _from_eap_node(match.group(2)), match.group(3)
    if port is not None:
        if "attn.head" not in dst:
            raise ValueError(f"EAP-IG edge {name!r} has an input port but its child is no head.")
        dst = f"{dst}.{port}"
    return src, dst


def _to_eap_edge(edge: tuple[str, str]) -> str:
    src, dst = edge
    node = node_of(dst)
    suffix = f"<{dst[-1]}>" if node != dst else ""
    return f"{_to_eap_node(src)}->{_to_eap_node(node)}{suffix}"


def _eap_prune(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """EAP-IG's ``Graph.prune`` (src/eap/graph.py): repeatedly keep the nodes with an in-graph
    outgoing edge and an in-graph incoming one (input counts as having one), then the edges whose
    parent and child are kept (logits always is), until nothing changes; node flags in the file
    play no part. The result: the in-graph edges on a path from input to logits."""
    while True:
        alive = {s for s, _ in edges} & ({node_of(d) for _, d in edges} | {EMBED})
        kept = {(s, d) for s, d in edges if s in alive and (d == UNEMBED or node_of(d) in alive)}
        if kept == edges:
            return kept
        edges = kept


def _eap_ig_order(n_layers: int, n_heads: int, parallel_attn_mlp: bool) -> list[tuple[str, str]]:
    """Every edge in the order EAP-IG's ``Graph.from_model`` adds them (its ``to_json`` writes
    them so): per layer, each source so far into each head's q, k, v, then the MLP's inputs
    (with a parallel block, each source's MLP edge follows its head edges); logits last."""
    residual, out = [EMBED], []
    for layer in range(n_layers):
        heads = [head_node(layer, h) for h in range(n_heads)]
        for src in residual:
            out += [(src, f"{head}.{x}") for head in heads for x in "qkv"]
            if parallel_attn_mlp:
                out.append((src, mlp_node(layer)))
        residual += heads
        if not parallel_attn_mlp:
            out += [(src, mlp_node(layer)) for src in residual]
        residual.append(mlp_node(layer))
    return out + [(src, UNEMBED) for src in residual]


def from_eap(source: Mapping[str, Any] | str | os.PathLike, *, prune: bool = False) -> Circuit:
    """Read an EAP-IG / MIB graph (``Graph.to_json`` output, as a dict or a path).

    ``prune=False`` keeps every in-graph edge as the file has it, as EAP-IG's ``Graph.from_json``
    does; a file written after ``apply_topn(n, prune=False)`` / ``apply_threshold(..., prune=False)``
    may have in-graph edges whose nodes are not in the graph: those nodes become circuit nodes
    (every edge end is one), a warning says so, and ``to_eap`` writes their flags back as the
    file had them. ``prune=True`` keeps what EAP-IG's ``Graph.prune`` (run before evaluation)
    keeps: the in-graph edges on a path from input to logits, and their ends as nodes.

    EAP-IG has no value for "not scored": every edge's score starts at 0.0 and ``to_json``
    writes it, as ``to_eap`` writes the edges a circuit has no score for. An edge score of
    exactly 0.0 is therefore read as no score, so a circuit written and read back has the
    scores it had (its in-graph flags say which edges are in it)."""
    data = read_json(source)
    missing = [key for key in ("cfg", "nodes", "edges") if key not in data]
    if missing:
        raise ValueError(
            f"Not an EAP-IG graph: keys {missing} are missing (found {sorted(data)[:8]}); "
            "EAP-IG's Graph.to_json writes 'cfg', 'nodes' and 'edges'."
        )
    cfg = dict(data["cfg"])
    nodes, node_scores, neurons = set(), {}, {}
    for name, entry in data["nodes"].items():
        node = _from_eap_node(name)
        if isinstance(entry, bool):  # early EAP-IG: {name: in_graph}
            entry = {"in_graph": entry}
        if entry.get("in_graph"):
            nodes.add(node)
        if entry.get("score") is not None:
            node_scores[node] = entry["score"]
        kept = {k: entry[k] for k in ("neurons", "neurons_scores") if k in entry}
        if kept:
            neurons[name] = kept
    edges, edge_scores = set(), {}
    for name, entry in data["edges"].items():
        edge = _from_eap_edge(name)
        if entry.get("in_graph"):
            edges.add(edge)
        if entry.get("score") is not None and entry["score"] != 0.0:
            edge_scores[edge] = entry["score"]
    metadata: dict[str, Any] = {"eap_cfg": cfg, "eap_node_order": list(data["nodes"])}
    if neurons:
        metadata["eap_neurons"] = neurons
    if prune:
        edges = _eap_prune(edges)
        nodes = {node_of(x) for e in edges for x in e} | ({UNEMBED} & nodes)
    else:
        unflagged = {node_of(x) for e in edges for x in e} - nodes - {UNEMBED}
        if unflagged:
            metadata["eap_nodes_not_in_graph"] = sorted(_to_eap_node(n) for n in unflagged)
            warnings.warn(
                f"EAP-IG graph has in-graph edges whose nodes are not in the graph "
                f"({sorted(unflagged)[:5]}): it was written unpruned (e.g. apply_topn(n, "
                "prune=False)). Kept as written; EAP-IG prunes it before evaluation: "
                "from_eap(..., prune=True) gives what it evaluates.",
                UserWarning,
                stacklevel=3,
            )
    return Circuit(
        frozenset(nodes),
        frozenset(edges),
        edge_scores,
        node_scores,
        n_layers=cfg.get("n_layers"),
        n_heads=cfg.get("n_heads"),
        metadata=metadata,
    )


def to_eap(
    circuit: Circuit,
    path: str | os.PathLike | None = None,
    *,
    d_model: int | None = None,
    parallel_attn_mlp: bool | None = None,
) -> dict[str, Any]:
    """Write as EAP-IG's ``Graph.to_json`` dict: every node and edge of the complete graph for
    ``circuit.n_layers`` x ``circuit.n_heads``, in the order EAP-IG writes them (so a file read
    and written back is the same text); returned, and saved to ``path`` if given.

    A circuit with nodes but no edges (e.g. ``Circuit.from_heads``) is written as EAP-IG's own
    node-level selection (``apply_topn(level='node')``) leaves it: input, logits and the
    circuit's nodes in the graph, with every edge of the complete graph whose parent is input or
    a circuit node and whose child is logits or a circuit node (each of a head's q / k / v
    inputs). Every node then has an edge from input and one to logits, so EAP-IG's ``prune()``
    keeps all of them. A circuit with edges, or one read from an EAP-IG file, is written as it
    is (only its edges in the graph).

    ``parallel_attn_mlp=True`` writes the graph of a model whose blocks run attention and MLP
    in parallel (GPT-NeoX / Pythia: no edge from a block's heads to its MLP); default: what the
    circuit was read as (EAP-IG's ``cfg``, auto-circuit's prune scores), else False. For a
    circuit of ``graph_edge_scores``, pass ``si.analysis.is_parallel_attn_mlp(model)``."""
    n_layers, n_heads = need_shape(circuit, "Writing an EAP-IG graph")
    cfg = dict(circuit.metadata.get("eap_cfg", {}))
    cfg.update(n_layers=n_layers, n_heads=n_heads)
    if parallel_attn_mlp is not None:
        cfg["parallel_attn_mlp"] = bool(parallel_attn_mlp)
    cfg.setdefault(
        "parallel_attn_mlp", bool(circuit.metadata.get("auto_circuit_parallel_attn_mlp", False))
    )
    if d_model is not None:
        cfg["d_model"] = d_model
    if cfg.get("d_model") is None:
        raise ValueError("EAP-IG graphs record d_model: pass to_eap(..., d_model=model's d_model).")
    universe = _eap_ig_order(n_layers, n_heads, bool(cfg["parallel_attn_mlp"]))
    in_nodes, in_edges = set(circuit.nodes), set(circuit.edges)
    if not in_edges and in_nodes - {EMBED, UNEMBED} and "eap_node_order" not in circuit.metadata:
        in_nodes |= {EMBED, UNEMBED}
        in_edges = {(s, d) for s, d in universe if s in in_nodes and node_of(d) in in_nodes}
    unflagged = set(circuit.metadata.get("eap_nodes_not_in_graph", ()))
    neurons = circuit.metadata.get("eap_neurons", {})
    nodes: dict[str, Any] = {}
    order = circuit.metadata.get("eap_node_order") or [
        _to_eap_node(n) for n in sources(n_layers, n_heads)
    ] + ["logits"]
    for name in order:
        node = _from_eap_node(name)
        flag = (node in in_nodes and name not in unflagged) or node == UNEMBED
        entry: dict[str, Any] = {"in_graph": flag}
        if node in circuit.node_scores:
            entry["score"] = circuit.node_scores[node]
        entry.update(neurons.get(name, {}))
        nodes[name] = entry
    edges = {}
    unknown = sorted((circuit.edges | set(circuit.edge_scores)) - set(universe))
    if unknown:
        raise ValueError(
            f"Edges {unknown[:3]} are not edges of EAP-IG's graph (heads take q/k/v inputs from "
            "earlier layers only); give head destinations a port, e.g. 'blocks.1.attn.head.0.q'."
        )
    for edge in universe:
        edges[_to_eap_edge(edge)] = {
            "score": circuit.edge_scores.get(edge, 0.0),
            "in_graph": edge in in_edges,
        }
    data = {"cfg": cfg, "nodes": nodes, "edges": edges}
    if path is not None:
        write_atomically(Path(path), json.dumps(data))
    return data


__all__ = ["from_eap", "to_eap"]
