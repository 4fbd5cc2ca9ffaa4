"""Circuits (sets of heads / MLPs) and how well a subnetwork's component scores match one."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._types import NotFoundError
from .overlap import _hypergeometric_pmf

_NODE = re.compile(r"^blocks\.(\d+)\.(attn\.head\.(\d+)|mlp)$")


def head_node(layer: int, head: int) -> str:
    """Canonical node name of an attention head: ``blocks.{layer}.attn.head.{head}``."""
    return f"blocks.{layer}.attn.head.{head}"


def mlp_node(layer: int) -> str:
    """Canonical node name of a layer's MLP: ``blocks.{layer}.mlp``."""
    return f"blocks.{layer}.mlp"


@dataclass(frozen=True)
class Circuit:
    """A set of canonical nodes (``blocks.L.attn.head.H``, ``blocks.L.mlp``) and optional edges
    between them."""

    nodes: frozenset[str]
    edges: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", frozenset(self.nodes))
        object.__setattr__(self, "edges", frozenset(tuple(e) for e in self.edges))
        bad = sorted(
            n for n in self.nodes | {x for e in self.edges for x in e} if not _NODE.match(n)
        )
        if bad:
            raise NotFoundError(
                f"Unknown circuit node name(s) {bad[:5]}; expected 'blocks.L.attn.head.H' or "
                "'blocks.L.mlp' (see si.analysis.head_node / mlp_node)."
            )
        missing = sorted({x for e in self.edges for x in e} - self.nodes)
        if missing:
            object.__setattr__(self, "nodes", self.nodes | frozenset(missing))

    @classmethod
    def from_heads(cls, heads: Iterable[tuple[int, int]], mlps: Iterable[int] = ()) -> Circuit:
        return cls(
            frozenset(
                [head_node(layer, h) for layer, h in heads] + [mlp_node(layer) for layer in mlps]
            )
        )

    def heads(self) -> list[tuple[int, int]]:
        out = []
        for node in sorted(self.nodes):
            match = _NODE.match(node)
            if match and match.group(3) is not None:
                out.append((int(match.group(1)), int(match.group(3))))
        return out

    def check_against(self, n_layers: int, n_heads: int) -> None:
        """Raise if a head node lies outside a ``[n_layers, n_heads]`` model."""
        outside = [head_node(ly, h) for ly, h in self.heads() if ly >= n_layers or h >= n_heads]
        if outside:
            raise NotFoundError(
                f"Circuit nodes {outside[:5]} do not exist in a model with {n_layers} layers and "
                f"{n_heads} heads per layer."
            )


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
    head_scores: Tensor | Mapping[tuple[int, int], float], circuit: Circuit, *, k: int | None = None
) -> CircuitComparison:
    """Compare per-head scores (``[layers, heads]``, e.g. ``si.analysis.head_scores``) with a
    circuit's heads. ``nan`` scores (heads a subnetwork does not cover) count as lowest."""
    if isinstance(head_scores, Mapping):
        layers = 1 + max(layer for layer, _ in head_scores)
        heads = 1 + max(h for _, h in head_scores)
        matrix = torch.full((layers, heads), float("nan"))
        for (layer, head), value in head_scores.items():
            matrix[layer, head] = value
        head_scores = matrix
    scores = torch.nan_to_num(head_scores.detach().double().cpu(), nan=-math.inf)
    n_layers, n_heads = scores.shape
    circuit.check_against(n_layers, n_heads)
    labels = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in circuit.heads():
        labels[layer, head] = True
    size = int(labels.sum())
    if size == 0:
        raise ValueError("The circuit has no attention-head nodes to compare per-head scores with.")
    k = size if k is None else k
    if not 1 <= k <= scores.numel():
        raise ValueError(f"k must be in [1, {scores.numel()}], got {k}.")
    top = torch.zeros(scores.numel(), dtype=torch.bool)
    top[scores.flatten().argsort(descending=True, stable=True)[:k]] = True
    overlap = int((top & labels.flatten()).sum())
    total = scores.numel()
    low, pmf = _hypergeometric_pmf(total, size, k)
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


__all__ = ["Circuit", "CircuitComparison", "compare_to_circuit", "head_node", "mlp_node", "roc_auc"]
