"""Reading and writing circuits in the formats of other circuit-discovery tools.

Every format is mapped onto :class:`~subnet_interp.analysis.Circuit`'s canonical names
(``embed``, ``blocks.L.attn.head.H[.q|.k|.v]``, ``blocks.L.mlp``, ``unembed``). What each reads:

* **EAP / EAP-IG and MIB** (``Graph.to_json`` of hannamw/EAP-IG, also the MIB circuit-track
  submission format): ``cfg`` (``n_layers``, ``n_heads``; the rest is kept), ``nodes[name]``
  (``in_graph``, optional ``score``; ``neurons`` / ``neurons_scores`` are kept as metadata) and
  ``edges[name]`` (``in_graph``, ``score``). Node names ``input``, ``a{L}.h{H}``, ``m{L}``,
  ``logits``; edge names ``parent->child`` with ``<q|k|v>`` after a head child. Writing gives
  every edge of the complete graph (``score`` 0 and ``in_graph`` false where the circuit has
  neither), so EAP-IG's ``Graph.from_json`` and MIB's evaluation load it.
* **ACDC** (ArthurConmy/Automatic-Circuit-Discovery): a mapping from
  ``(child_hook, child_index, parent_hook, parent_index)`` to a bool (``save_subgraph`` and the
  ``get_*_true_edges`` ground truths), to an ``Edge`` with ``present`` / ``effect_size``, or to
  an effect size; or the list of ``(key, effect_size)`` pairs ``save_edges`` pickles. Indices may
  be ``TorchIndex`` objects, their ``hashable_tuple`` (``(None, None, h)``) or ``None``-tuples.
  Hooks: ``blocks.0.hook_resid_pre`` / ``hook_embed`` / ``hook_pos_embed`` (embed),
  ``blocks.L.attn.hook_result`` (head outputs), ``blocks.L.hook_{q,k,v}_input`` (head inputs),
  ``blocks.L.hook_mlp_in`` / ``hook_mlp_out``, ``blocks.{N-1}.hook_resid_post`` (unembed).
  ACDC's internal edges (``q_input -> hook_q``, ``hook_q -> hook_result``, ``mlp_in ->
  mlp_out``) carry no circuit information of their own and are written present for every node
  of the circuit; ones read as absent are kept in ``metadata``. ACDC saves pickles, which this
  library never opens: unpickle them yourself (with ``acdc`` importable) and pass the object.
* **auto-circuit** (UFO-101/auto-circuit): ``PruneScores``, a tensor per destination module
  (``blocks.L.hook_{q,k,v}_input`` or ``hook_attn_in`` ``[n_heads, n_src]``,
  ``blocks.L.hook_mlp_in`` and ``blocks.{N-1}.hook_resid_post`` ``[n_src]``) indexed by source
  in forward order (``Resid Start``, then per layer each head then the MLP); or a dict of edge
  names (``"A0.1->A1.2.Q"``, ``"Resid Start->MLP 0"``, ``"MLP 3->Resid End"``) to scores. The
  circuit is the edges whose score is non-zero (or above ``threshold``, or the ``top_k``); all
  scores are kept.
* **subnet_interp's own JSON** (``Circuit.save`` / ``load``): everything a circuit holds.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .circuits import EMBED, UNEMBED, Circuit, head_node, mlp_node, node_of

FORMAT_KEY = "subnet_interp_circuit"
FORMAT_VERSION = 1


# ---- the complete graph ---------------------------------------------------------------------
def sources(n_layers: int, n_heads: int, *, attn_only: bool = False) -> list[str]:
    """Edge sources in forward order: embed, then per layer each head and the MLP."""
    out = [EMBED]
    for layer in range(n_layers):
        out += [head_node(layer, h) for h in range(n_heads)]
        if not attn_only:
            out.append(mlp_node(layer))
    return out


def all_edges(
    n_layers: int,
    n_heads: int,
    *,
    attn_only: bool = False,
    parallel_attn_mlp: bool = False,
    ports: bool = True,
) -> list[tuple[str, str]]:
    """Every edge of a residual transformer's graph: each source feeds every later head input
    (``q``/``k``/``v`` separately with ``ports``), MLP and the unembedding."""
    srcs = sources(n_layers, n_heads, attn_only=attn_only)
    edges = []

    def before(layer: int, into_mlp: bool) -> list[str]:
        out = []
        for s in srcs:
            match = re.match(r"blocks\.(\d+)\.(attn|mlp)", s)
            if match is None:
                out.append(s)
                continue
            src_layer, kind = int(match.group(1)), match.group(2)
            if src_layer < layer or (
                into_mlp and src_layer == layer and kind == "attn" and not parallel_attn_mlp
            ):
                out.append(s)
        return out

    for layer in range(n_layers):
        for port in ("q", "k", "v") if ports else (None,):
            for h in range(n_heads):
                edges += [(s, head_node(layer, h, port)) for s in before(layer, False)]
        if not attn_only:
            edges += [(s, mlp_node(layer)) for s in before(layer, True)]
    edges += [(s, UNEMBED) for s in srcs]
    return edges


def _need_shape(circuit: Circuit, what: str) -> tuple[int, int]:
    if circuit.n_layers is None or circuit.n_heads is None:
        raise ValueError(
            f"{what} needs the model's shape; this circuit has n_layers={circuit.n_layers}, "
            f"n_heads={circuit.n_heads}. Build it with Circuit(..., n_layers=, n_heads=) or "
            "dataclasses.replace(circuit, n_layers=..., n_heads=...)."
        )
    return circuit.n_layers, circuit.n_heads


# ---- EAP / EAP-IG / MIB ---------------------------------------------------------------------
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
    match = re.match(r"^blocks\.(\d+)\.(?:attn\.head\.(\d+)|mlp)$", node)
    assert match is not None, node
    if match.group(2) is not None:
        return f"a{match.group(1)}.h{match.group(2)}"
    return f"m{match.group(1)}"


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


def _read_json(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"No circuit file at {str(path)!r}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error}); is it a circuit file?"
        ) from None


def from_eap(source: Mapping[str, Any] | str | os.PathLike) -> Circuit:
    """Read an EAP-IG / MIB graph (``Graph.to_json`` output, as a dict or a path)."""
    data = _read_json(source)
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
        if entry.get("score") is not None:
            edge_scores[edge] = entry["score"]
    metadata = {"eap_cfg": cfg, "eap_node_order": list(data["nodes"])}
    if neurons:
        metadata["eap_neurons"] = neurons
    circuit = Circuit(
        frozenset(nodes),
        frozenset(edges),
        edge_scores,
        node_scores,
        n_layers=cfg.get("n_layers"),
        n_heads=cfg.get("n_heads"),
        metadata=metadata,
    )
    if nodes != set(circuit.nodes):  # an edge in the graph whose node was not marked in_graph
        extra = sorted(set(circuit.nodes) - nodes)
        raise ValueError(
            f"EAP-IG graph has edges in the graph whose nodes are not: {extra[:5]}; the file is "
            "inconsistent (EAP-IG's prune() would remove those edges)."
        )
    return circuit


def to_eap(
    circuit: Circuit, path: str | os.PathLike | None = None, *, d_model: int | None = None
) -> dict[str, Any]:
    """Write as EAP-IG's ``Graph.to_json`` dict: every node and edge of the complete graph for
    ``circuit.n_layers`` x ``circuit.n_heads``; returned, and saved to ``path`` if given."""
    n_layers, n_heads = _need_shape(circuit, "Writing an EAP-IG graph")
    cfg = dict(circuit.metadata.get("eap_cfg", {}))
    cfg.update(n_layers=n_layers, n_heads=n_heads)
    cfg.setdefault("parallel_attn_mlp", False)
    if d_model is not None:
        cfg["d_model"] = d_model
    if cfg.get("d_model") is None:
        raise ValueError("EAP-IG graphs record d_model: pass to_eap(..., d_model=model's d_model).")
    neurons = circuit.metadata.get("eap_neurons", {})
    nodes: dict[str, Any] = {}
    order = circuit.metadata.get("eap_node_order") or [
        _to_eap_node(n) for n in sources(n_layers, n_heads)
    ] + ["logits"]
    for name in order:
        node = _from_eap_node(name)
        entry: dict[str, Any] = {"in_graph": node in circuit.nodes or node == UNEMBED}
        if node in circuit.node_scores:
            entry["score"] = circuit.node_scores[node]
        entry.update(neurons.get(name, {}))
        nodes[name] = entry
    edges = {}
    universe = all_edges(n_layers, n_heads, parallel_attn_mlp=bool(cfg["parallel_attn_mlp"]))
    unknown = sorted((circuit.edges | set(circuit.edge_scores)) - set(universe))
    if unknown:
        raise ValueError(
            f"Edges {unknown[:3]} are not edges of EAP-IG's graph (heads take q/k/v inputs from "
            "earlier layers only); give head destinations a port, e.g. 'blocks.1.attn.head.0.q'."
        )
    for edge in universe:
        edges[_to_eap_edge(edge)] = {
            "score": circuit.edge_scores.get(edge, 0.0),
            "in_graph": edge in circuit.edges,
        }
    data = {"cfg": cfg, "nodes": nodes, "edges": edges}
    if path is not None:
        _write_atomically(Path(path), json.dumps(data))
    return data


# ---- ACDC -----------------------------------------------------------------------------------
_ACDC_HOOK = re.compile(
    r"^(?:(hook_embed|hook_pos_embed)|blocks\.(\d+)\.(hook_resid_pre|attn\.hook_result|"
    r"hook_([qkv])_input|hook_mlp_in|hook_mlp_out|hook_resid_post|attn\.hook_([qkv])))$"
)


def _index_tuple(index: Any) -> tuple:
    if index is None:
        return (None,)
    if hasattr(index, "hashable_tuple"):
        return tuple(index.hashable_tuple)
    if isinstance(index, (tuple, list)):
        return tuple(index)
    raise ValueError(
        f"ACDC index {index!r} is neither a TorchIndex nor a tuple such as (None, None, 3)."
    )


def _acdc_head(index: tuple, hook: str) -> int:
    if len(index) != 3 or index[:2] != (None, None) or not isinstance(index[2], int):
        raise ValueError(f"ACDC head hook {hook!r} needs an index (None, None, h), got {index}.")
    return index[2]


def _acdc_end(hook: str, index: Any, parent: bool) -> tuple[str, str | None]:
    """(endpoint, internal) for an ACDC hook; ``internal`` names the hook kind of internal nodes."""
    match = _ACDC_HOOK.match(hook)
    if match is None:
        raise ValueError(
            f"Unknown ACDC hook name {hook!r}; expected blocks.0.hook_resid_pre, hook_embed, "
            "blocks.L.attn.hook_result, blocks.L.hook_q/k/v_input, blocks.L.attn.hook_q/k/v, "
            "blocks.L.hook_mlp_in / hook_mlp_out or blocks.L.hook_resid_post."
        )
    index = _index_tuple(index)
    if match.group(1):
        return EMBED, None
    layer, kind = int(match.group(2)), match.group(3)
    if kind == "hook_resid_pre":
        if layer != 0:
            raise ValueError(f"ACDC residual input must be blocks.0.hook_resid_pre, got {hook!r}.")
        return EMBED, None
    if kind == "hook_resid_post":
        return UNEMBED, None
    if kind == "attn.hook_result":
        return head_node(layer, _acdc_head(index, hook)), None
    if match.group(4):
        return head_node(layer, _acdc_head(index, hook), match.group(4)), None
    if match.group(5):
        return head_node(layer, _acdc_head(index, hook), match.group(5)), "qkv"
    return mlp_node(layer), None


def _edge_value(value: Any) -> tuple[bool, float | None]:
    if isinstance(value, bool):
        return value, None
    if hasattr(value, "present"):
        size = getattr(value, "effect_size", None)
        return bool(value.present), None if size is None else float(size)
    if isinstance(value, (int, float)):
        return True, float(value)
    if value is None:
        return True, None
    raise ValueError(
        f"ACDC edge value {value!r} is none of: bool, Edge (present/effect_size), effect size."
    )


def from_acdc(edges: Any, *, n_heads: int | None = None) -> Circuit:
    """Read ACDC edges (see the module docstring for the accepted shapes)."""
    items = edges.items() if isinstance(edges, Mapping) else edges
    present_edges, scores, absent_internal = set(), {}, []
    embed_hooks, last_layer, max_head = set(), None, -1
    for item in items:
        try:
            key, value = item
            child, child_index, parent, parent_index = key
        except (TypeError, ValueError):
            raise ValueError(
                f"ACDC entry {item!r} is not ((child_hook, child_index, parent_hook, "
                "parent_index), value)."
            ) from None
        present, size = _edge_value(value)
        dst, dst_internal = _acdc_end(child, child_index, parent=False)
        src, src_internal = _acdc_end(parent, parent_index, parent=True)
        if parent in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"):
            embed_hooks.add(parent)
        if child.endswith("hook_resid_post"):
            last_layer = int(child.split(".")[1])
        for end in (src, dst):
            match = re.match(r"blocks\.\d+\.attn\.head\.(\d+)", end)
            if match:
                max_head = max(max_head, int(match.group(1)))
        if (
            src_internal
            or dst_internal
            or (child.endswith("hook_mlp_out") and parent.endswith("hook_mlp_in"))
        ):
            if not present:
                absent_internal.append(
                    [
                        child,
                        list(_index_tuple(child_index)),
                        parent,
                        list(_index_tuple(parent_index)),
                    ]
                )
            continue
        if dst == EMBED or src == UNEMBED:
            raise ValueError(f"ACDC edge {key!r} runs against the forward direction.")
        edge = (src, dst)
        if present:
            present_edges.add(edge)
        if size is not None:
            scores[edge] = size
    metadata: dict[str, Any] = {"acdc_embed_hooks": sorted(embed_hooks)}
    if absent_internal:
        metadata["acdc_absent_internal"] = absent_internal
    return Circuit(
        frozenset(),
        frozenset(present_edges),
        scores,
        n_layers=None if last_layer is None else last_layer + 1,
        n_heads=n_heads,
        metadata=metadata,
    )


def _acdc_hook(end: str, parent: bool, n_layers: int | None, embed_hook: str) -> tuple[str, tuple]:
    if end == EMBED:
        return embed_hook, (None,)
    if end == UNEMBED:
        if n_layers is None:
            raise ValueError("Writing edges into the unembedding in ACDC form needs n_layers.")
        return f"blocks.{n_layers - 1}.hook_resid_post", (None,)
    node = node_of(end)
    match = re.match(r"^blocks\.(\d+)\.(?:attn\.head\.(\d+)|mlp)$", node)
    assert match is not None
    layer = match.group(1)
    if match.group(2) is not None:
        head = (None, None, int(match.group(2)))
        if parent:
            return f"blocks.{layer}.attn.hook_result", head
        if node == end:
            raise ValueError(
                f"ACDC edges into a head name its q, k or v input; {end!r} has none "
                "(use e.g. head_node(L, H, 'q'))."
            )
        return f"blocks.{layer}.hook_{end[-1]}_input", head
    return f"blocks.{layer}.hook_mlp_{'out' if parent else 'in'}", (None,)


def to_acdc(circuit: Circuit, *, complete: bool = False) -> dict[tuple, bool]:
    """ACDC's subgraph dict, keys ``(child_hook, child_index, parent_hook, parent_index)`` with
    indices as ``hashable_tuple``\\ s. ``complete=True`` lists every edge of the graph (what
    ``TLACDCExperiment.load_subgraph`` expects), including ACDC's internal edges; otherwise only
    the present edges (the form of ACDC's ``get_*_true_edges``)."""
    embed_hooks = circuit.metadata.get("acdc_embed_hooks") or ["blocks.0.hook_resid_pre"]
    out: dict[tuple, bool] = OrderedDict()

    def add(edge: tuple[str, str], present: bool) -> None:
        src, dst = edge
        child, child_index = _acdc_hook(dst, False, circuit.n_layers, embed_hooks[0])
        for hook in embed_hooks if src == EMBED else [None]:
            parent, parent_index = _acdc_hook(src, True, circuit.n_layers, hook or embed_hooks[0])
            out[(child, child_index, parent, parent_index)] = present

    if not complete:
        for edge in sorted(circuit.edges):
            add(edge, True)
        return out
    n_layers, n_heads = _need_shape(circuit, "A complete ACDC graph")
    for edge in all_edges(n_layers, n_heads):
        add(edge, edge in circuit.edges)
    absent = {
        (c, tuple(ci), p, tuple(pi))
        for c, ci, p, pi in circuit.metadata.get("acdc_absent_internal", [])
    }
    for layer in range(n_layers):
        for h in range(n_heads):
            index = (None, None, h)
            for x in "qkv":
                for key in (
                    (
                        f"blocks.{layer}.attn.hook_{x}",
                        index,
                        f"blocks.{layer}.hook_{x}_input",
                        index,
                    ),
                    (
                        f"blocks.{layer}.attn.hook_result",
                        index,
                        f"blocks.{layer}.attn.hook_{x}",
                        index,
                    ),
                ):
                    out[key] = head_node(layer, h) in circuit.nodes and key not in absent
        key = (f"blocks.{layer}.hook_mlp_out", (None,), f"blocks.{layer}.hook_mlp_in", (None,))
        out[key] = mlp_node(layer) in circuit.nodes and key not in absent
    return out


# ---- auto-circuit ---------------------------------------------------------------------------
_AC_DEST = re.compile(r"^blocks\.(\d+)\.hook_(q_input|k_input|v_input|attn_in|mlp_in|resid_post)$")
_AC_NODE = re.compile(r"^(?:(Resid Start)|(Resid End)|A(\d+)\.(\d+)(?:\.([QKV]))?|MLP (\d+))$")


def _from_ac_node(name: str) -> str:
    match = _AC_NODE.match(name.strip())
    if match is None:
        raise ValueError(
            f"Unknown auto-circuit node {name!r}; expected 'Resid Start', 'A<L>.<H>[.Q|K|V]', "
            "'MLP <L>' or 'Resid End'."
        )
    if match.group(1):
        return EMBED
    if match.group(2):
        return UNEMBED
    if match.group(3) is not None:
        port = match.group(5)
        return head_node(int(match.group(3)), int(match.group(4)), port.lower() if port else None)
    return mlp_node(int(match.group(6)))


def from_auto_circuit(
    prune_scores: Mapping[str, Any],
    *,
    threshold: float | None = None,
    top_k: int | None = None,
) -> Circuit:
    """Read auto-circuit prune scores (tensor per destination module) or an edge-name dict.

    The circuit holds the edges with a non-zero score, or ``|score| > threshold``, or the
    ``top_k`` largest ``|score|``; every score is kept in ``edge_scores``.
    """
    if not prune_scores:
        raise ValueError("Empty prune scores: nothing to read.")
    if all(isinstance(k, str) and "->" in k for k in prune_scores):
        scores = {}
        for name, value in prune_scores.items():
            src, dst = name.split("->", 1)
            score = 1.0 if isinstance(value, (list, tuple)) or value is True else float(value)
            scores[(_from_ac_node(src), _from_ac_node(dst))] = score
        return _select(scores, threshold, top_k, None, None, {})
    bad = [k for k in prune_scores if not _AC_DEST.match(str(k))]
    if bad:
        raise ValueError(
            f"Unknown auto-circuit destination module(s) {bad[:3]}; PruneScores are keyed by "
            "'blocks.L.hook_q_input' / k / v / 'hook_attn_in' / 'hook_mlp_in' / "
            "'blocks.N-1.hook_resid_post' (or pass a dict of edge names like 'A0.1->A1.2.Q')."
        )
    tensors = {k: torch.as_tensor(v).detach().cpu() for k, v in prune_scores.items()}
    end = [k for k in tensors if k.endswith("hook_resid_post")]
    if len(end) != 1:
        raise ValueError(
            f"Expected exactly one '...hook_resid_post' entry (the Resid End), got {end}."
        )
    n_layers = int(_AC_DEST.match(end[0]).group(1)) + 1
    attn = [t for k, t in tensors.items() if "_in" in k and "mlp" not in k]
    n_heads = attn[0].shape[0] if attn else None
    n_src = tensors[end[0]].shape[-1]
    if n_heads is None:
        raise ValueError("No attention destinations in the prune scores: cannot tell n_heads.")
    if n_src == 1 + n_layers * (n_heads + 1):
        attn_only = False
    elif n_src == 1 + n_layers * n_heads:
        attn_only = True
    else:
        raise ValueError(
            f"Resid End scores have {n_src} sources; with {n_layers} layers and {n_heads} heads "
            f"expected {1 + n_layers * (n_heads + 1)} (or {1 + n_layers * n_heads} attention-only)."
        )
    srcs = sources(n_layers, n_heads, attn_only=attn_only)
    scores: dict[tuple[str, str], float] = {}
    for key, tensor in tensors.items():
        match = _AC_DEST.match(key)
        layer, kind = int(match.group(1)), match.group(2)
        per_src = 1 + layer * (n_heads + (0 if attn_only else 1))
        if kind == "mlp_in":
            expected: tuple[int, ...] = (per_src + n_heads,)
        elif kind == "resid_post":
            expected = (len(srcs),)
        else:
            expected = (n_heads, per_src)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"Prune scores for {key!r} have shape {tuple(tensor.shape)}, expected {expected} "
                f"for {n_layers} layers x {n_heads} heads (per-position scores: pass one position "
                "or their sum)."
            )
        values = tensor.double().tolist()
        if kind in ("mlp_in", "resid_post"):
            dst = mlp_node(layer) if kind == "mlp_in" else UNEMBED
            for i, v in enumerate(values):
                scores[(srcs[i], dst)] = v
        else:
            port = None if kind == "attn_in" else kind[0]
            for h, row in enumerate(values):
                for i, v in enumerate(row):
                    scores[(srcs[i], head_node(layer, h, port))] = v
    metadata = {"auto_circuit_attn_only": attn_only}
    return _select(scores, threshold, top_k, n_layers, n_heads, metadata)


def _select(scores, threshold, top_k, n_layers, n_heads, metadata) -> Circuit:
    if threshold is not None and top_k is not None:
        raise ValueError("Give threshold or top_k, not both.")
    if top_k is not None:
        ranked = sorted(scores, key=lambda e: -abs(scores[e]))
        chosen = set(ranked[:top_k])
    else:
        limit = 0.0 if threshold is None else threshold
        chosen = {e for e, v in scores.items() if abs(v) > limit and not math.isnan(v)}
    return Circuit(
        frozenset(),
        frozenset(chosen),
        scores,
        n_layers=n_layers,
        n_heads=n_heads,
        metadata=metadata,
    )


def to_auto_circuit(circuit: Circuit, *, scores: bool = True) -> dict[str, Tensor]:
    """auto-circuit ``PruneScores`` for the complete graph: each edge's score from
    ``edge_scores`` (``scores=True``; edges without a score get 1 in the circuit, 0 outside) or
    circuit membership as 1 / 0 (``scores=False``)."""
    n_layers, n_heads = _need_shape(circuit, "auto-circuit prune scores")
    attn_only = bool(circuit.metadata.get("auto_circuit_attn_only", False))
    srcs = sources(n_layers, n_heads, attn_only=attn_only)
    position = {s: i for i, s in enumerate(srcs)}
    ported = any(node_of(d) != d for _, d in circuit.edges | set(circuit.edge_scores))
    unported = any(
        "attn.head" in d and node_of(d) == d for _, d in circuit.edges | set(circuit.edge_scores)
    )
    if ported and unported:
        raise ValueError("The circuit mixes head edges with and without q/k/v ports.")
    out: dict[str, Tensor] = {}
    per_layer = n_heads + (0 if attn_only else 1)
    for layer in range(n_layers):
        n_src = 1 + layer * per_layer
        for port in ("q", "k", "v") if not unported else (None,):
            name = f"blocks.{layer}.hook_{port}_input" if port else f"blocks.{layer}.hook_attn_in"
            out[name] = torch.zeros(n_heads, n_src)
        if not attn_only:
            out[f"blocks.{layer}.hook_mlp_in"] = torch.zeros(n_src + n_heads)
    out[f"blocks.{n_layers - 1}.hook_resid_post"] = torch.zeros(len(srcs))
    edges = circuit.edges | (set(circuit.edge_scores) if scores else set())
    for edge in edges:
        src, dst = edge
        if src not in position:
            raise ValueError(f"Edge {edge} has a source auto-circuit's graph does not have.")
        value = circuit.edge_scores.get(edge, 1.0) if scores else 1.0
        if scores is False and edge not in circuit.edges:
            continue
        node = node_of(dst)
        if dst == UNEMBED:
            out[f"blocks.{n_layers - 1}.hook_resid_post"][position[src]] = value
            continue
        match = re.match(r"^blocks\.(\d+)\.(?:attn\.head\.(\d+)|mlp)$", node)
        layer = int(match.group(1))
        if match.group(2) is None:
            tensor, index = out[f"blocks.{layer}.hook_mlp_in"], (position[src],)
        else:
            hook = f"hook_{dst[-1]}_input" if node != dst else "hook_attn_in"
            tensor, index = out[f"blocks.{layer}.{hook}"], (int(match.group(2)), position[src])
        if index[-1] >= tensor.shape[-1]:
            raise ValueError(f"Edge {edge} does not run forward (its source is not earlier).")
        tensor[index] = value
    return out


# ---- subnet_interp's own format -------------------------------------------------------------
def save(circuit: Circuit, path: str | os.PathLike) -> None:
    data = {
        FORMAT_KEY: FORMAT_VERSION,
        "nodes": sorted(circuit.nodes),
        "edges": sorted([list(e) for e in circuit.edges]),
        "edge_scores": sorted([[*e, v] for e, v in circuit.edge_scores.items()]),
        "node_scores": dict(sorted(circuit.node_scores.items())),
        "n_layers": circuit.n_layers,
        "n_heads": circuit.n_heads,
        "metadata": circuit.metadata,
    }
    _write_atomically(Path(path), json.dumps(data, indent=1))


def load(path: str | os.PathLike) -> Circuit:
    data = _read_json(path)
    if FORMAT_KEY not in data:
        if {"cfg", "nodes", "edges"} <= set(data):
            return from_eap(data)
        raise ValueError(
            f"{str(path)!r} is neither a subnet_interp circuit (key {FORMAT_KEY!r}) nor an "
            f"EAP-IG / MIB graph (keys cfg, nodes, edges); found keys {sorted(data)[:8]}. For "
            "ACDC or auto-circuit objects use Circuit.from_acdc / from_auto_circuit."
        )
    version = data[FORMAT_KEY]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has circuit format version {version!r}; this subnet_interp reads up "
            f"to {FORMAT_VERSION}. Upgrade subnet_interp to read it."
        )
    return Circuit(
        frozenset(data["nodes"]),
        frozenset(tuple(e) for e in data["edges"]),
        {(a, b): v for a, b, v in data["edge_scores"]},
        data["node_scores"],
        n_layers=data["n_layers"],
        n_heads=data["n_heads"],
        metadata=data.get("metadata", {}),
    )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def edge_universe(circuit: Circuit) -> list[tuple[str, str]]:
    """The complete edge set of the circuit's model (ported if the circuit's head edges are)."""
    n_layers, n_heads = _need_shape(circuit, "The complete edge set")
    ported = not any("attn.head" in d and node_of(d) == d for _, d in circuit.edges)
    return all_edges(n_layers, n_heads, ports=ported)


__all__: Iterable[str] = [
    "all_edges",
    "edge_universe",
    "from_acdc",
    "from_auto_circuit",
    "from_eap",
    "load",
    "save",
    "sources",
    "to_acdc",
    "to_auto_circuit",
    "to_eap",
]
