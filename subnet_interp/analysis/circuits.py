"""Circuits (sets of heads / MLPs, and edges between them) and the graph they live in: node
and edge names, the complete graph of a residual transformer (:func:`sources`,
:func:`all_edges`), and how well a subnetwork's component scores match a circuit.

Node names are ``embed``, ``blocks.L.attn.head.H``, ``blocks.L.mlp`` and ``unembed``; an edge's
destination may name a head input, ``blocks.L.attn.head.H.q|k|v``. :func:`node_position` is the
one parser of these names. Reading and writing other tools' formats is in
``si.analysis.circuit_formats`` (which imports this module, never the reverse).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._types import NotFoundError
from ._head_matrix import head_matrix
from .overlap import OverlapStats, hypergeometric_pmf

_NODE = re.compile(r"^(?:embed|unembed|blocks\.(\d+)\.(?:attn\.head\.(\d+)|mlp))$")
_PORT = re.compile(r"^(blocks\.\d+\.attn\.head\.\d+)\.([qkv])$")
EMBED, UNEMBED = "embed", "unembed"


# ---- node and edge names ----------------------------------------------------------------------
def head_node(layer: int, head: int, port: str | None = None) -> str:
    """Canonical node name of an attention head: ``blocks.{layer}.attn.head.{head}``; with
    ``port`` (``"q"``, ``"k"`` or ``"v"``) the name of that head input, used as an edge's end."""
    name = f"blocks.{layer}.attn.head.{head}"
    if port is None:
        return name
    if port not in ("q", "k", "v"):
        raise ValueError(f"port must be 'q', 'k' or 'v', got {port!r}.")
    return f"{name}.{port}"


def mlp_node(layer: int) -> str:
    """Canonical node name of a layer's MLP: ``blocks.{layer}.mlp``."""
    return f"blocks.{layer}.mlp"


def node_of(endpoint: str) -> str:
    """The node an edge endpoint belongs to (``blocks.1.attn.head.2.q`` -> its head)."""
    match = _PORT.match(endpoint)
    return match.group(1) if match else endpoint


def node_position(endpoint: str) -> tuple[int, int | None] | None:
    """Where a circuit node sits: ``(layer, head)`` for ``blocks.L.attn.head.H`` (also with a
    ``.q|.k|.v`` port), ``(layer, None)`` for ``blocks.L.mlp``, ``None`` for ``embed`` and
    ``unembed``. Raises ``ValueError`` for any other name.

    The one parser of circuit node names; the format readers and writers use it too.
    """
    match = _NODE.match(node_of(endpoint))
    if match is None:
        raise ValueError(
            f"{endpoint!r} is no circuit node name (embed, blocks.L.attn.head.H[.q|k|v], "
            "blocks.L.mlp, unembed)."
        )
    if match.group(1) is None:
        return None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


# ---- the complete graph -----------------------------------------------------------------------
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
            position = node_position(s)
            if position is None:  # embed
                out.append(s)
                continue
            src_layer, head = position
            if src_layer < layer or (
                into_mlp and src_layer == layer and head is not None and not parallel_attn_mlp
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


def edge_universe(circuit: Circuit) -> list[tuple[str, str]]:
    """The complete edge set of the circuit's model (ported if the circuit's head edges are)."""
    n_layers, n_heads = need_shape(circuit, "The complete edge set")
    ported = not any("attn.head" in d and node_of(d) == d for _, d in circuit.edges)
    return all_edges(n_layers, n_heads, ports=ported)


def need_shape(circuit: Circuit, what: str) -> tuple[int, int]:
    if circuit.n_layers is None or circuit.n_heads is None:
        raise ValueError(
            f"{what} needs the model's shape; this circuit has n_layers={circuit.n_layers}, "
            f"n_heads={circuit.n_heads}. Build it with Circuit(..., n_layers=, n_heads=) or "
            "dataclasses.replace(circuit, n_layers=..., n_heads=...)."
        )
    return circuit.n_layers, circuit.n_heads


def _check_names(nodes, edges) -> None:
    bad = sorted(n for n in nodes if not _NODE.match(n))
    for src, dst in edges:
        if not _NODE.match(src) or src == UNEMBED:
            bad.append(src)
        if not (_NODE.match(dst) or _PORT.match(dst)) or dst == EMBED:
            bad.append(dst)
    if bad:
        raise NotFoundError(
            f"Unknown circuit node name(s) {sorted(set(bad))[:5]}; expected 'embed', "
            "'blocks.L.attn.head.H', 'blocks.L.mlp' or 'unembed' (edge sources), and those or "
            "'blocks.L.attn.head.H.q|k|v' (edge destinations, except 'embed'); see "
            "si.analysis.head_node / mlp_node. To import another tool's names use "
            "Circuit.from_acdc / from_auto_circuit / from_eap."
        )


@dataclass(frozen=True)
class Circuit:
    """A circuit: canonical nodes and optional edges between them, with optional scores.

    Nodes are ``embed``, ``blocks.L.attn.head.H``, ``blocks.L.mlp`` and ``unembed``. An edge is
    ``(source, destination)``; a destination that is a head may name the input it enters,
    ``blocks.L.attn.head.H.q`` / ``.k`` / ``.v``. Every edge end is also a node.

    ``edge_scores`` / ``node_scores`` keep the scores a discovery tool attached (also for edges
    outside the circuit, as attribution methods score every edge); ``n_layers`` / ``n_heads``
    give the model's shape when known (needed to write complete graphs); ``metadata`` keeps what
    an imported format carries that a circuit has no field for, so that exporting to the same
    format gives the file back.
    """

    nodes: frozenset[str]
    edges: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    edge_scores: Mapping[tuple[str, str], float] = field(default_factory=dict, hash=False)
    node_scores: Mapping[str, float] = field(default_factory=dict, hash=False)
    n_layers: int | None = None
    n_heads: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", frozenset(self.nodes))
        edges = frozenset((str(a), str(b)) for a, b in self.edges)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(
            self,
            "edge_scores",
            {(str(a), str(b)): float(v) for (a, b), v in self.edge_scores.items()},
        )
        object.__setattr__(
            self, "node_scores", {str(k): float(v) for k, v in self.node_scores.items()}
        )
        object.__setattr__(self, "metadata", dict(self.metadata))
        _check_names(self.nodes | set(self.node_scores), edges | set(self.edge_scores))
        ends = {node_of(x) for e in edges for x in e}
        if ends - self.nodes:
            object.__setattr__(self, "nodes", self.nodes | frozenset(ends))
        if self.n_layers is not None or self.n_heads is not None:
            self.check_against(self.n_layers, self.n_heads)

    @classmethod
    def from_heads(cls, heads: Iterable[tuple[int, int]], mlps: Iterable[int] = ()) -> Circuit:
        """A circuit of nodes only: the ``(layer, head)`` pairs in ``heads`` and the MLPs of the
        layers in ``mlps``."""
        return cls(
            frozenset(
                [head_node(layer, h) for layer, h in heads] + [mlp_node(layer) for layer in mlps]
            )
        )

    @classmethod
    def from_edge_scores(cls, scores: Mapping[tuple[str, str], float], **kwargs: Any) -> Circuit:
        """The strongest scored edges as a circuit, e.g. of ``si.analysis.graph_edge_scores``.

        ``from_edge_scores(scores, *, top_k=None, threshold=None, per_kind=False, kinds=None,
        connect=True, n_layers=None, n_heads=None)``. Exactly one of ``top_k`` (the ``top_k``
        highest scores; equal scores keep the order of ``scores``, so the count is exact) or
        ``threshold`` (every score ``>= threshold``); ``nan`` scores are never kept.
        ``kinds`` keeps only edges of those kinds (``si.analysis.edge_kind``: ``"head->q"``,
        ``"head->k"``, ``"head->v"``, ``"head->mlp"``, ``"mlp->q"``, ..., ``"mlp->mlp"``);
        ``per_kind=True`` takes the ``top_k`` of each kind instead of overall.

        Ranking across kinds is meaningful for ``graph_edge_scores``: each score is
        ``||W_s R_t||_F / (||W_s||_F ||R_t||_F)``, a cosine-like ratio in ``[0, 1]`` that does
        not depend on the scale of either matrix, whatever the kind. What differs is the rank
        of the factors (a head writes and reads through ``d_head`` dimensions, an MLP through
        up to ``d_model``), so the kinds' distributions can still differ on a given model:
        ``per_kind=True`` ranks within each kind when they do.

        Nodes are the kept edges' ends; the kept edges carry their scores (``edge_scores``).
        ``connect=True`` also adds, without scores, ``embed -> node`` (each of a head's
        ``q/k/v``) for every node with no kept incoming edge and ``node -> unembed`` for every
        node with no kept outgoing one: EAP-IG's ``Graph.prune`` (run before MIB / EAP-IG
        evaluation) keeps only nodes on a path from input to logits, and the scores have no
        embed / unembed edges, so without them an exported circuit is pruned to nothing.
        ``n_layers`` / ``n_heads`` default to one more than the largest layer / head named in
        ``scores`` (all of them for ``graph_edge_scores`` output).
        """
        from ._edge_circuits import from_edge_scores

        return from_edge_scores(scores, **kwargs)

    def heads(self) -> list[tuple[int, int]]:
        """The circuit's heads as ``(layer, head)``, sorted."""
        positions = (node_position(node) for node in self.nodes)
        return sorted(p for p in positions if p is not None and p[1] is not None)

    def mlps(self) -> list[int]:
        """The layers whose MLP is in the circuit, sorted."""
        positions = (node_position(node) for node in self.nodes)
        return sorted(p[0] for p in positions if p is not None and p[1] is None)

    def check_against(self, n_layers: int | None, n_heads: int | None) -> None:
        """Raise if a node lies outside a model with ``n_layers`` layers of ``n_heads`` heads."""
        outside = []
        for name in (
            self.nodes | set(self.node_scores) | {node_of(x) for e in self.edge_scores for x in e}
        ):
            position = node_position(name)
            if position is None:
                continue
            layer, head = position
            if (n_layers is not None and layer >= n_layers) or (
                head is not None and n_heads is not None and head >= n_heads
            ):
                outside.append(name)
        if outside:
            raise NotFoundError(
                f"Circuit nodes {sorted(outside)[:5]} do not exist in a model with {n_layers} "
                f"layers and {n_heads} heads per layer."
            )

    # ---- formats: each method calls its tool's module in ``analysis/_formats/`` (imported
    # when called, since those modules build ``Circuit`` objects; see circuit_formats.py) ------
    @classmethod
    def from_eap(cls, graph: Mapping[str, Any] | str | os.PathLike, **kwargs: Any) -> Circuit:
        """From an EAP / EAP-IG ``Graph.to_json`` file or dict (also MIB circuit-track files);
        ``prune=True`` keeps what EAP-IG's ``Graph.prune`` keeps."""
        from ._formats import eap

        return eap.from_eap(graph, **kwargs)

    def to_eap(self, path: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
        """As an EAP-IG ``Graph.from_json``-loadable dict (written to ``path`` if given)."""
        from ._formats import eap

        return eap.to_eap(self, path, **kwargs)

    @classmethod
    def from_acdc(cls, edges: Any, **kwargs: Any) -> Circuit:
        """From ACDC edges: ``{(child_hook, child_index, parent_hook, parent_index): value}``."""
        from ._formats import acdc

        return acdc.from_acdc(edges, **kwargs)

    def to_acdc(self, **kwargs: Any) -> dict[tuple, bool]:
        """As ACDC's subgraph dict ``{(child_hook, child_index, parent_hook, parent_index): bool}``."""
        from ._formats import acdc

        return acdc.to_acdc(self, **kwargs)

    @classmethod
    def from_auto_circuit(cls, prune_scores: Mapping[str, Any], **kwargs: Any) -> Circuit:
        """From auto-circuit ``PruneScores`` (or a dict of auto-circuit edge names)."""
        from ._formats import auto_circuit

        return auto_circuit.from_auto_circuit(prune_scores, **kwargs)

    def to_auto_circuit(self, **kwargs: Any) -> dict[str, Tensor]:
        """As auto-circuit ``PruneScores``: a tensor per destination hook."""
        from ._formats import auto_circuit

        return auto_circuit.to_auto_circuit(self, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write this circuit as JSON in subnet_interp's own format (everything it holds)."""
        from ._formats import native

        native.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read a JSON circuit: subnet_interp's own format or an EAP-IG / MIB graph."""
        from ._formats import native

        return native.load(path)


@dataclass(frozen=True)
class CircuitComparison:
    """How well per-head scores single out a circuit's heads.

    ``auc``: ROC AUC of the scores for circuit membership (Mann-Whitney, ties count half).
    ``precision_at_k`` / ``recall_at_k``: of the ``k`` top-scoring heads (``k`` = circuit size by
    default). ``overlap`` is how many top-k heads are in the circuit; ``expected_overlap`` and
    ``p_value`` (hypergeometric, overlap this large or larger) are its chance baseline.
    """

    auc: float
    k: int
    precision_at_k: float
    recall_at_k: float
    overlap: int
    expected_overlap: float
    p_value: float


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores`` for boolean ``labels`` (ties count half); vectorised."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    positives, negatives = scores[labels], scores[~labels]
    if positives.numel() == 0 or negatives.numel() == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).double().sum()
    ties = (positives[:, None] == negatives[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (positives.numel() * negatives.numel()))


def compare_to_circuit(
    head_scores: Tensor | Mapping[tuple[int, int], float] | Mapping[str, Tensor],
    circuit: Circuit,
    *,
    k: int | None = None,
) -> CircuitComparison:
    """Compare per-head scores (``[layers, heads]``, e.g. ``si.analysis.head_scores``) with a
    circuit's heads. ``nan`` scores (heads a subnetwork does not cover) count as lowest. An
    encoder-decoder's per-kind dict of scores is refused (circuit heads name no stack): pass
    one kind's tensor, e.g. ``scores["decoder.attn"]``."""
    scores = head_matrix(head_scores, "compare_to_circuit").detach().double().cpu()
    n_layers, n_heads = scores.shape
    if circuit.n_layers not in (None, n_layers) or circuit.n_heads not in (None, n_heads):
        raise ValueError(
            f"The head scores are of a model with {n_layers} layers x {n_heads} heads, but the "
            f"circuit is of one with {circuit.n_layers} x {circuit.n_heads}: compare scores and "
            "a circuit of the same model."
        )
    circuit.check_against(n_layers, n_heads)
    labels = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in circuit.heads():
        labels[layer, head] = True
    return _compare(scores, labels, k, "attention-head nodes")


@dataclass(frozen=True)
class CircuitOverlap:
    """Node and edge agreement of two circuits on one model, with hypergeometric chance levels.

    ``nodes`` (heads and MLPs) and ``edges`` are dicts with the keys of
    :meth:`OverlapStats.as_dict <subnet_interp.analysis.OverlapStats.as_dict>`: ``n`` (the number
    of candidates: the complete graph's nodes or edges), ``size_a``, ``size_b``,
    ``intersection``, ``union``, ``iou`` (Jaccard), ``dice``, ``overlap_coefficient``,
    ``sharing_a``, ``sharing_b``; and ``expected`` (the expected intersection of independent
    circuits of those sizes) and ``p_value`` (of sharing at least that many by chance). The old
    keys ``shared``, ``jaccard`` and ``universe`` still read (``intersection``, ``iou``, ``n``)
    with a ``FutureWarning``.
    """

    nodes: dict[str, float | int]
    edges: dict[str, float | int]


class _OverlapDict(dict):
    """A dict of overlap statistics that still answers the pre-0.2 key names, with a warning."""

    _RENAMED = {"shared": "intersection", "jaccard": "iou", "universe": "n"}

    def __missing__(self, key: str) -> float | int:
        if key not in self._RENAMED:
            raise KeyError(key)
        new = self._RENAMED[key]
        warnings.warn(
            f"compare_circuits(...).nodes / .edges key {key!r} is deprecated; use {new!r} (the "
            "keys of OverlapStats.as_dict()).",
            FutureWarning,
            stacklevel=2,
        )
        return self[new]


def _overlap_stats(a: set, b: set, universe: int) -> dict[str, float | int]:
    out = _OverlapDict(OverlapStats(universe, len(a), len(b), len(a & b)).as_dict())
    out["expected"] = len(a) * len(b) / universe if universe else float("nan")
    if universe and len(a) and len(b):
        low, pmf = hypergeometric_pmf(universe, len(a), len(b))
        out["p_value"] = min(1.0, float(pmf[max(0, len(a & b) - low) :].sum()))
    else:
        out["p_value"] = float("nan")
    return out


def compare_circuits(a: Circuit, b: Circuit) -> CircuitOverlap:
    """How much two circuits of the same model share (nodes: heads and MLPs; edges: if both
    have any), against the chance of independent circuits of the same sizes. Head-input ports
    are compared as given if both circuits use them, else edges are compared by node pairs.
    The candidates are the complete graph's nodes and edges, of an attention-only or a
    parallel attention / MLP model where a circuit was read from one (auto-circuit's or ACDC's
    attention-only graphs, EAP-IG's ``parallel_attn_mlp``)."""
    n_layers = a.n_layers if a.n_layers is not None else b.n_layers
    n_heads = a.n_heads if a.n_heads is not None else b.n_heads
    if n_layers is None or n_heads is None:
        raise ValueError("compare_circuits needs n_layers and n_heads on at least one circuit.")
    for c in (a, b):
        c.check_against(n_layers, n_heads)
        if c.n_layers not in (None, n_layers) or c.n_heads not in (None, n_heads):
            raise ValueError(
                f"The circuits are of different models: {a.n_layers}x{a.n_heads} vs "
                f"{b.n_layers}x{b.n_heads} (layers x heads)."
            )
    attn_only = _shared_kind(a, b, "attn_only", "attention-only")
    parallel = _shared_kind(a, b, "parallel_attn_mlp", "parallel attention and MLP")
    if attn_only and (a.mlps() or b.mlps()):
        raise ValueError(
            f"One circuit was read from an attention-only model, but the circuits have MLPs "
            f"{sorted(set(a.mlps()) | set(b.mlps()))}: they are not of the same model."
        )
    inner = lambda c: {n for n in c.nodes if n not in (EMBED, UNEMBED)}  # noqa: E731
    nodes = _overlap_stats(inner(a), inner(b), n_layers * (n_heads + (0 if attn_only else 1)))
    ported = all(any(node_of(d) != d for _, d in c.edges) for c in (a, b))
    edge_set = lambda c: (  # noqa: E731
        set(c.edges) if ported else {(s, node_of(d)) for s, d in c.edges}
    )
    complete = all_edges(
        n_layers, n_heads, ports=ported, attn_only=attn_only, parallel_attn_mlp=parallel
    )
    universe = len(set(complete))
    edges = _overlap_stats(edge_set(a), edge_set(b), universe)
    return CircuitOverlap(nodes, edges)


def _graph_kind(circuit: Circuit, kind: str) -> bool | None:
    """What the file a circuit was read from says of its model's graph: ``kind`` is
    ``"attn_only"`` (no MLPs) or ``"parallel_attn_mlp"`` (GPT-NeoX / Pythia: an MLP does not
    read its own block's heads); None where it says nothing."""
    meta = circuit.metadata
    from_auto_circuit = "auto_circuit_attn_only" in meta
    if kind == "attn_only":
        if from_auto_circuit:
            return bool(meta["auto_circuit_attn_only"])
        return True if meta.get("acdc_attn_only") else None
    if meta.get("auto_circuit_parallel_attn_mlp"):
        return True
    eap = meta.get("eap_cfg", {})
    if "parallel_attn_mlp" in eap:
        return bool(eap["parallel_attn_mlp"])
    return False if from_auto_circuit else None


def _shared_kind(a: Circuit, b: Circuit, kind: str, words: str) -> bool:
    known = {v for v in (_graph_kind(a, kind), _graph_kind(b, kind)) if v is not None}
    if len(known) > 1:
        raise ValueError(
            f"The circuits are of different models: one was read from a {words} model's graph, "
            "the other not."
        )
    return known.pop() if known else False


def compare_edges(
    scores: Mapping[tuple[str, str], float], circuit: Circuit, *, k: int | None = None
) -> CircuitComparison:
    """Compare per-edge scores (e.g. ``si.analysis.graph_edge_scores``) with a circuit's edges:
    ROC AUC, precision / recall of the top ``k`` (default: as many as the circuit has among the
    scored edges) and the hypergeometric chance baseline. Only scored edges are candidates;
    head-input ports are dropped on both sides when the scores have none."""
    if not scores:
        raise ValueError("No edge scores given.")
    ported = any(node_of(d) != d for _, d in scores)
    edge = (lambda e: e) if ported else (lambda e: (e[0], node_of(e[1])))
    keys = sorted({edge(e) for e in scores})
    merged: dict[tuple[str, str], float] = {}
    for e, v in scores.items():
        merged[edge(e)] = max(merged.get(edge(e), -math.inf), float(v))
    truth = {edge(e) for e in circuit.edges}
    values = torch.tensor([merged[e] for e in keys], dtype=torch.float64)
    labels = torch.tensor([e in truth for e in keys])
    return _compare(values, labels, k, "edges among the scored ones")


def _compare(scores: Tensor, labels: Tensor, k: int | None, what: str) -> CircuitComparison:
    scores = torch.nan_to_num(scores.flatten().double(), nan=-math.inf)
    labels = labels.flatten().bool()
    size = int(labels.sum())
    if size == 0:
        raise ValueError(f"The circuit has no {what} to compare the scores with.")
    k = size if k is None else k
    if not 1 <= k <= scores.numel():
        raise ValueError(f"k must be in [1, {scores.numel()}], got {k}.")
    top = torch.zeros(scores.numel(), dtype=torch.bool)
    top[scores.argsort(descending=True, stable=True)[:k]] = True
    overlap = int((top & labels).sum())
    total = scores.numel()
    low, pmf = hypergeometric_pmf(total, size, k)
    p_value = float(pmf[max(0, overlap - low) :].sum())
    return CircuitComparison(
        auc=roc_auc(scores, labels),
        k=k,
        precision_at_k=overlap / k,
        recall_at_k=overlap / size,
        overlap=overlap,
        expected_overlap=size * k / total,
        p_value=min(1.0, p_value),
    )
