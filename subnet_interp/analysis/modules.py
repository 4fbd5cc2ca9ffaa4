"""Modules: spectral clustering of the weight graph (Filan et al. 2021, "Clusterability in
Neural Networks"), with a shuffled-weights null, and where a subnetwork sits among the modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import adapters
from .._fingerprint import read_canonical
from .._subnetwork import Subnetwork
from ._order import model_then_subnetwork


def chain_weights(
    model: Any, subnetwork: Subnetwork | None = None, include=None
) -> dict[str, Tensor]:
    """``|W|`` of the model's 2-D targets in order, as ``[out, in]`` matrices forming a chain
    (each layer's inputs are the previous layer's outputs), masked by ``subnetwork`` if given."""
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    chosen = adapters.select(adapter.all_targets(model), include, family=adapter.family)
    out = {}
    for name, target in chosen.items():
        weight = read_canonical(root, target).detach().abs().double()
        if weight.dim() != 2:
            raise ValueError(
                f"modules() clusters chains of 2-D weight matrices; {name!r} has shape {tuple(weight.shape)}."
            )
        if subnetwork is not None and name in subnetwork:
            weight = weight * subnetwork[name].to(weight.device)
        if target.axes[:1] == ("in",):  # transformers' Conv1D stores [in, out]
            weight = weight.T
        out[name] = weight
    sizes = list(out.values())
    for (prev_name, prev), (name, nxt) in zip(
        list(out.items())[:-1], list(out.items())[1:], strict=True
    ):
        if nxt.shape[1] != prev.shape[0]:
            raise ValueError(
                f"modules() needs a chain of layers: {name!r} reads {nxt.shape[1]} inputs but "
                f"{prev_name!r} writes {prev.shape[0]}. Select a chain with `include=`."
            )
    if not sizes:
        raise ValueError("No weights to cluster.")
    return out


def adjacency(weights: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """The symmetric neuron-graph adjacency of a chain of ``[out, in]`` matrices, and the
    neuron count of each layer (inputs first)."""
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    total = starts[-1]
    a = torch.zeros(total, total, dtype=torch.float64, device=weights[0].device)
    for i, w in enumerate(weights):
        rows = slice(starts[i + 1], starts[i + 2])
        cols = slice(starts[i], starts[i + 1])
        a[rows, cols] = w
        a[cols, rows] = w.T
    return a, sizes


def _kmeans(points: Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> Tensor:
    n = points.shape[0]
    centres = points[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):  # k-means++ seeding
        distance = torch.cdist(points, centres).min(1).values ** 2
        probabilities = (
            distance / distance.sum() if distance.sum() > 0 else torch.full_like(distance, 1 / n)
        )
        centres = torch.cat(
            [centres, points[torch.multinomial(probabilities.float(), 1, generator=generator)]]
        )
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(1)
        updated = torch.stack(
            [points[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)]
        )
        if torch.allclose(updated, centres):
            break
        centres = updated
    return labels


def spectral_labels(a: Tensor, n_clusters: int, generator: torch.Generator) -> Tensor:
    """Normalised spectral clustering (Shi & Malik 2000; Ng, Jordan & Weiss 2002)."""
    degree = a.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    normalised = inv_sqrt[:, None] * a * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(normalised)
    embedding = vectors[:, -n_clusters:]
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return _kmeans(embedding.cpu(), n_clusters, generator)


def normalised_cut(a: Tensor, labels: Tensor) -> float:
    """``sum_k cut(C_k, rest) / vol(C_k)``: lower means more clusterable."""
    labels = labels.to(a.device)
    onehot = torch.nn.functional.one_hot(labels).double()
    within = (onehot.T @ a @ onehot).diagonal()
    volume = onehot.T @ a.sum(1)
    keep = volume > 0
    return float(((volume - within)[keep] / volume[keep]).sum())


@dataclass(frozen=True)
class Modules:
    """Result of :func:`modules`.

    ``labels`` maps each layer of neurons (``"input"`` then each weight's output side) to a
    cluster id per neuron; ``ncut`` is the normalised cut of that clustering; ``null_ncuts`` those
    of the same clustering run on within-layer shuffles of the weights; ``z`` and ``percentile``
    (the fraction of null n-cuts at or below the observed) compare them — a clusterable network
    has a low percentile and a strongly negative ``z``.
    """

    labels: Mapping[str, Tensor]
    ncut: float
    null_ncuts: Tensor
    z: float
    percentile: float
    weight_names: tuple[str, ...]


@model_then_subnetwork(trailing=1)
def modules(
    model: Any,
    subnetwork: Subnetwork | None,
    n_clusters: int,
    *,
    include: str | Iterable[str] | None = None,
    null_samples: int = 20,
    generator: torch.Generator | None = None,
) -> Modules:
    """Cluster the neurons of a chain of weight matrices by spectral clustering of the graph with
    edge weights ``|W|`` (Filan et al. 2021), and compare the n-cut against within-layer shuffles.

    The old order ``modules(model, n_clusters, *, subnetwork=None)`` still works, with a
    ``FutureWarning``.

    Args:
        model: a model whose selected targets form a chain of 2-D matrices (an MLP).
        subnetwork: cluster the graph of the subnetwork's weights only (``|W| * mask``);
            ``None`` clusters the whole model.
        n_clusters: number of modules.
        include: target patterns selecting the chain (default: the default targets).
        null_samples: shuffled networks for the null distribution.
    """
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    weights = chain_weights(model, subnetwork, include)
    names = tuple(weights)
    a, sizes = adjacency(list(weights.values()))
    labels = spectral_labels(a, n_clusters, gen)
    observed = normalised_cut(a, labels)
    null = []
    for _ in range(null_samples):
        shuffled = [
            w.flatten()[torch.randperm(w.numel(), generator=gen).to(w.device)].view(w.shape)
            for w in weights.values()
        ]
        a_null, _ = adjacency(shuffled)
        null.append(normalised_cut(a_null, spectral_labels(a_null, n_clusters, gen)))
    null_t = torch.tensor(null, dtype=torch.float64)
    spread = float(null_t.std()) if null_samples > 1 else float("nan")
    z = (observed - float(null_t.mean())) / spread if spread and spread > 0 else float("nan")
    percentile = float((null_t <= observed).double().mean()) if null_samples else float("nan")
    layer_names = ["input", *names]
    split = torch.split(labels, sizes)
    return Modules(
        dict(zip(layer_names, split, strict=True)), observed, null_t, z, percentile, names
    )


def module_enrichment(subnetwork: Subnetwork, result: Modules) -> dict[int, dict[str, float]]:
    """For each module: the fraction of the subnetwork's kept weights inside it (both ends in the
    module), the same fraction for all weights (the chance level), and their ratio."""
    kept_in, all_in = {}, {}
    kept_total = all_total = 0
    layers = list(result.labels)
    for index, name in enumerate(result.weight_names):
        mask = subnetwork[name]
        if mask.shape[0] != result.labels[layers[index + 1]].numel():
            mask = mask.T  # stored [in, out]
        out_labels, in_labels = result.labels[layers[index + 1]], result.labels[layers[index]]
        same = out_labels[:, None] == in_labels[None, :]
        for cluster in out_labels.unique().tolist():
            inside = same & (out_labels[:, None] == cluster)
            kept_in[cluster] = kept_in.get(cluster, 0) + int((mask.cpu() & inside).sum())
            all_in[cluster] = all_in.get(cluster, 0) + int(inside.sum())
        kept_total += int(mask.sum())
        all_total += mask.numel()
    out = {}
    for cluster in sorted(all_in):
        kept_fraction = kept_in[cluster] / kept_total if kept_total else float("nan")
        chance = all_in[cluster] / all_total
        out[cluster] = {
            "kept_fraction": kept_fraction,
            "chance": chance,
            "enrichment": kept_fraction / chance if chance else float("nan"),
        }
    return out


@dataclass(frozen=True)
class Lesion:
    """One lesion test (Casper et al. 2022): the neurons of ``module`` in hidden layer ``layer``
    (named by the weight that writes them) silenced, the change in ``evaluate`` it causes
    (``effect``), the changes from ``random_effects`` lesions of as many random neurons of the
    same layer, and ``percentile``: the fraction of random lesions at least as damaging."""

    layer: str
    module: int
    size: int
    effect: float
    random_effects: Tensor
    percentile: float


def module_lesions(
    model: Any,
    result: Modules,
    evaluate: Any,
    *,
    n_random: int = 20,
    generator: torch.Generator | None = None,
) -> list[Lesion]:
    """Lesion each module within each hidden layer of the clustered chain: the outgoing weights
    of its neurons are masked to zero (so the neurons' activations reach nothing), and the
    damage ``evaluate(model) - evaluate(unlesioned model)`` is set against lesions of random
    neuron sets of the same size in the same layer (Casper et al. 2022, "Graphical
    clusterability and local specialization in deep neural networks").

    ``evaluate(model) -> float`` is a loss (higher is worse) run under ``si.masked``; the model
    is unchanged afterwards.
    """
    from .._masked import masked

    if n_random < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    adapter = adapters.resolve(model)
    targets = adapter.all_targets(model)
    names = list(result.weight_names)
    for name in names:
        if name not in targets:
            raise ValueError(f"{name!r} from the clustering is not a target of this model.")
    base = float(evaluate(model))

    def lesioned(name: str, neurons: Tensor) -> float:
        target = targets[name]
        mask = torch.ones(target.shape, dtype=torch.bool)
        axis = 0 if target.axes[:1] == ("in",) else 1  # the input side of [out, in]
        mask.index_fill_(axis, neurons, False)
        with masked(model, Subnetwork({name: mask})):
            return float(evaluate(model)) - base

    lesions = []
    layers = list(result.labels)  # "input", then each weight's output side
    for index in range(1, len(names)):  # hidden layers: written by names[i-1], read by names[i]
        labels = result.labels[layers[index]]
        reader = names[index]
        for module in labels.unique().tolist():
            neurons = (labels == module).nonzero().flatten().cpu()
            effect = lesioned(reader, neurons)
            controls = torch.tensor(
                [
                    lesioned(
                        reader, torch.randperm(labels.numel(), generator=gen)[: neurons.numel()]
                    )
                    for _ in range(n_random)
                ],
                dtype=torch.float64,
            )
            lesions.append(
                Lesion(
                    layers[index],
                    int(module),
                    int(neurons.numel()),
                    effect,
                    controls,
                    float((controls >= effect).double().mean()),
                )
            )
    return lesions


__all__ = [
    "Lesion",
    "Modules",
    "adjacency",
    "chain_weights",
    "module_enrichment",
    "module_lesions",
    "modules",
    "normalised_cut",
    "spectral_labels",
]
