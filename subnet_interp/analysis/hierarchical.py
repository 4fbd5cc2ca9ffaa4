"""Hierarchical modules (Watanabe, Hiramatsu & Kashino 2019, "Interpreting layered neural
networks via hierarchical modular representation", ICONIP): hidden units described by how they
co-vary with the input and output dimensions over the data, clustered by Ward's method into a
tree whose cut at every level gives modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import adapters
from .._subnetwork import Subnetwork
from .modules import Modules, chain_weights, module_enrichment

FEATURES = ("input", "output")


def ward_linkage(points: Tensor) -> Tensor:
    """Ward's (1963) minimum-variance agglomerative clustering of the rows of ``points``.

    Returns the tree in SciPy's linkage format, ``[n - 1, 4]`` float64: row ``s`` merges the
    clusters ``a < b`` (ids below ``n`` are rows of ``points``, ``n + s`` the cluster made at
    step ``s``) at height ``d`` into a cluster of ``size`` rows. Heights follow the
    Lance–Williams update for Ward's criterion on Euclidean distances (Lance & Williams 1967),
    ``d(k, i∪j)² = ((n_k+n_i) d(k,i)² + (n_k+n_j) d(k,j)² − n_k d(i,j)²) / (n_k+n_i+n_j)``,
    starting from ``d(i, j) = ‖x_i − x_j‖``; at each step the closest pair merges (ties: the
    first pair in row-major order). ``O(n²)`` memory and ``n`` vectorised steps.
    """
    if points.dim() != 2 or points.shape[0] < 2:
        raise ValueError(
            f"ward_linkage needs a [n, features] matrix with n >= 2, got shape {tuple(points.shape)}."
        )
    n = points.shape[0]
    x = points.detach().double()
    squared = torch.cdist(x, x).square()
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    squared.fill_diagonal_(float("inf"))
    size = torch.ones(n, dtype=torch.float64, device=x.device)
    ids = torch.arange(n, dtype=torch.float64, device=x.device)
    linkage = torch.empty(n - 1, 4, dtype=torch.float64, device=x.device)
    for step in range(n - 1):
        flat = squared.argmin()
        i, j = flat // n, flat % n
        d_ij = squared[i, j].clone()
        n_i, n_j = size[i], size[j]
        merged = ((size + n_i) * squared[i] + (size + n_j) * squared[j] - size * d_ij) / (
            size + n_i + n_j
        )
        merged = torch.where(torch.isfinite(merged), merged, inf)  # inactive slots stay out
        merged[i] = inf
        merged[j] = inf
        squared[i] = merged
        squared[:, i] = merged
        squared[j] = inf
        squared[:, j] = inf
        pair = torch.stack([ids[i], ids[j]])
        linkage[step, 0] = pair.min()
        linkage[step, 1] = pair.max()
        linkage[step, 2] = d_ij.clamp(min=0).sqrt()
        linkage[step, 3] = n_i + n_j
        size[i] = n_i + n_j
        ids[i] = n + step
    return linkage


def cut_linkage(linkage: Tensor, n_clusters: int) -> Tensor:
    """Cluster labels ``[n]`` from cutting a linkage tree into ``n_clusters`` clusters (undoing
    its last ``n_clusters - 1`` merges); clusters are numbered by their first row."""
    n = linkage.shape[0] + 1
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be an int in [1, {n}], got {n_clusters!r}.")
    cluster = torch.arange(n)
    for step, (a, b) in enumerate(linkage[: n - n_clusters, :2].long().tolist()):
        cluster[(cluster == a) | (cluster == b)] = n + step
    _, labels = torch.unique(cluster, return_inverse=True)
    first = torch.full((int(labels.max()) + 1,), n).scatter_reduce(
        0, labels, torch.arange(n), reduce="amin"
    )
    return first.argsort().argsort()[labels]


def leaf_order(linkage: Tensor) -> list[int]:
    """The rows of the clustered matrix from left to right in the dendrogram."""
    n = linkage.shape[0] + 1
    children = linkage[:, :2].long().tolist()
    order, stack = [], [2 * n - 2]
    while stack:
        node = stack.pop()
        if node < n:
            order.append(node)
        else:
            left, right = children[node - n]
            stack += [right, left]
    return order


def _run(model: Any, batch: Any) -> Any:
    return model(batch[0] if isinstance(batch, tuple | list) else batch)


def _correlations(
    model: Any,
    data: Iterable[Any],
    weight_names: tuple[str, ...],
    forward: Callable[[Any, Any], Any],
) -> tuple[Tensor, Tensor, Tensor]:
    """Pearson correlations over the data of every hidden unit with every input and every
    output dimension, ``([units, d_in], [units, d_out], unit std [units])``."""
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    targets = adapter.all_targets(model)
    modules = [root.get_submodule(targets[name].module) for name in weight_names]
    captured: dict[int, Tensor] = {}

    def reading(index: int):
        def hook(_module, args):
            captured[index] = args[0].detach().flatten(0, -2).double()

        return hook

    def writing(_module, _args, output):
        captured[len(modules)] = output.detach().flatten(0, -2).double()

    handles = [m.register_forward_pre_hook(reading(i)) for i, m in enumerate(modules)]
    handles.append(modules[-1].register_forward_hook(writing))
    sums: dict[str, Tensor] = {}
    count = 0
    try:
        with torch.no_grad():
            for batch in data:
                captured.clear()
                forward(model, batch)
                if len(captured) != len(modules) + 1:
                    raise ValueError(
                        "hierarchical_modules saw only some of the chain's layers run on a batch; "
                        f"the chain is {list(weight_names)}. Pass `forward=` if the model needs "
                        "more than model(batch[0])."
                    )
                x, y = captured[0], captured[len(modules)]
                h = torch.cat([captured[i] for i in range(1, len(modules))], dim=1)
                parts = {
                    "x": x.sum(0), "xx": x.square().sum(0), "y": y.sum(0),
                    "yy": y.square().sum(0), "h": h.sum(0), "hh": h.square().sum(0),
                    "hx": h.T @ x, "hy": h.T @ y,
                }  # fmt: skip
                for key, value in parts.items():
                    sums[key] = sums[key] + value if key in sums else value
                count += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if count < 2:
        raise ValueError(f"hierarchical_modules needs at least 2 examples in `data`, got {count}.")

    def spread(total: Tensor, squares: Tensor) -> tuple[Tensor, Tensor]:
        mean = total / count
        return mean, (squares / count - mean.square()).clamp(min=0).sqrt()

    (mean_x, std_x), (mean_y, std_y) = spread(sums["x"], sums["xx"]), spread(sums["y"], sums["yy"])
    mean_h, std_h = spread(sums["h"], sums["hh"])

    def correlation(cross: Tensor, mean_o: Tensor, std_o: Tensor) -> Tensor:
        covariance = cross / count - mean_h[:, None] * mean_o[None, :]
        scale = std_h[:, None] * std_o[None, :]
        return torch.where(scale > 1e-12, covariance / scale.clamp(min=1e-12), 0.0).clamp(-1, 1)

    return correlation(sums["hx"], mean_x, std_x), correlation(sums["hy"], mean_y, std_y), std_h


@dataclass(frozen=True)
class HierarchicalModules:
    """Result of :func:`hierarchical_modules`: the hidden units' feature vectors and their Ward
    tree. Units are numbered through the hidden layers in order (``layers``, ``layer_sizes``);
    units constant over the data (``dead``) have no correlations and are left out of the tree.

    Attributes:
        linkage: the tree over the clustered units, ``[clustered - 1, 4]`` in SciPy's linkage
            format (see :func:`~subnet_interp.analysis.hierarchical.ward_linkage`); its leaf
            ``i`` is unit ``clustered[i]``.
        clustered: ``[clustered]``, the units in the tree (every unit not ``dead``).
        features: ``[clustered, features]``, the vectors that were clustered.
        input_correlation, output_correlation: ``[units, d_in]`` and ``[units, d_out]``, each
            unit's (signed) correlation over the data with each input and output dimension.
        dead: ``[units]``, units constant over the data (their correlations are 0).
        layers: each hidden layer, named by the weight that writes it.
        layer_sizes: units per hidden layer.
        weight_names: the chain of weights (inputs to outputs).
    """

    linkage: Tensor
    clustered: Tensor
    features: Tensor
    input_correlation: Tensor
    output_correlation: Tensor
    dead: Tensor
    layers: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    weight_names: tuple[str, ...]

    @property
    def n_units(self) -> int:
        """Number of hidden units (clustered or dead)."""
        return self.dead.numel()

    def cut(self, n_modules: int) -> Tensor:
        """Module of every hidden unit ``[units]`` when the tree is cut into ``n_modules``
        modules, numbered by their first unit; ``-1`` for dead units."""
        labels = torch.full((self.n_units,), -1, dtype=torch.long)
        labels[self.clustered.cpu()] = cut_linkage(self.linkage.cpu(), n_modules)
        return labels

    def heights(self) -> Tensor:
        """Merge heights, lowest first; a large gap before the last ``k - 1`` merges says the
        network has about ``k`` well-separated modules."""
        return self.linkage[:, 2]

    def profiles(self, n_modules: int) -> tuple[Tensor, Tensor]:
        """Mean input and output correlation of each module's units, ``[k, d_in]`` and
        ``[k, d_out]``: what the paper reads each module's role from (its sign says whether the
        module's units rise or fall with a dimension)."""
        labels = self.cut(n_modules).to(self.input_correlation.device)
        onehot = torch.nn.functional.one_hot(labels + 1, n_modules + 1)[:, 1:].double()
        onehot = onehot / onehot.sum(0, keepdim=True)
        return onehot.T @ self.input_correlation, onehot.T @ self.output_correlation

    def as_modules(self, n_modules: int) -> Modules:
        """The cut as a :class:`~subnet_interp.analysis.Modules`, so that
        :func:`~subnet_interp.analysis.module_enrichment` and
        :func:`~subnet_interp.analysis.module_lesions` apply to it. Hidden units keep their
        module (dead units ``-1``); each input and output dimension joins the module whose mean
        correlation with it is largest in magnitude. ``ncut``, ``z`` and ``percentile`` are ``nan`` (there is no
        shuffle null here) and ``null_ncuts`` is empty."""
        labels = self.cut(n_modules)
        input_profile, output_profile = self.profiles(n_modules)
        per_layer = dict(zip(self.layers, torch.split(labels, list(self.layer_sizes)), strict=True))
        layer_labels = {
            "input": input_profile.abs().argmax(0).cpu(),
            **per_layer,
            self.weight_names[-1]: output_profile.abs().argmax(0).cpu(),
        }
        nan = float("nan")
        return Modules(
            layer_labels, nan, torch.empty(0, dtype=torch.float64), nan, nan, self.weight_names
        )

    def enrichment(self, subnetwork: Subnetwork, n_modules: int) -> dict[int, dict[str, float]]:
        """Where ``subnetwork`` sits among the ``n_modules`` modules:
        :func:`~subnet_interp.analysis.module_enrichment` of :meth:`as_modules`."""
        return module_enrichment(subnetwork, self.as_modules(n_modules))


def hierarchical_modules(
    model: Any,
    data: Iterable[Any],
    *,
    include: str | Iterable[str] | None = None,
    features: tuple[str, ...] | str = FEATURES,
    signs: str = "absolute",
    normalize: bool = True,
    forward: Callable[[Any, Any], Any] | None = None,
) -> HierarchicalModules:
    """Hierarchical modular representation of a layered network (Watanabe, Hiramatsu &
    Kashino 2019).

    For hidden unit ``j`` with output ``o_j`` over the data, the paper's feature vector is
    ``v_j = (r(x_1, o_j), …, r(x_I, o_j), r(o_j, y_1), …, r(o_j, y_K))``: the Pearson
    correlation ``r`` with every input dimension ``x_i`` and every output dimension ``y_k``
    (here the network's own outputs, the last weight's result). All hidden units of all layers
    are clustered together by Ward's method on the Euclidean distance between feature vectors,
    and the dendrogram cut at each level gives the modules of that resolution; a module's mean
    signed correlations (:meth:`HierarchicalModules.profiles`) say which inputs it rises or
    falls with and which outputs it drives.

    Two departures by default, both switchable: the clustered vectors are ``|v_j|`` and scaled
    to unit length. With signed vectors, two units of one sub-network that correlate with its
    dimensions in opposite directions are as far apart as units of two unrelated sub-networks,
    and without the scaling weakly tuned units of every sub-network gather near the origin; on
    independent random sub-networks side by side (``tasks.independent_mlps``, 2 or 3 blocks,
    2 to 4 hidden layers, 20 seeds each) the defaults recovered the blocks exactly every time,
    the signed unscaled vectors (``signs="keep", normalize=False``) and ``signs="align"`` never.
    The paper also reads the signs of its vectors; here the signed correlations are kept in
    the result and in :meth:`HierarchicalModules.profiles`.

    Args:
        model: a model whose selected 2-D targets form a chain (an MLP), as for
            :func:`~subnet_interp.analysis.modules`.
        data: batches; by default the model runs on ``batch[0]`` (or the batch itself).
        include: target patterns selecting the chain (default: the default targets).
        features: ``("input", "output")`` (the paper), or only one of them.
        signs: ``"absolute"`` (cluster ``|v_j|``), ``"keep"`` (the signed vectors), or
            ``"align"`` (each vector times the sign of its largest-magnitude entry, so units
            that differ only in sign cluster together).
        normalize: scale each vector to unit Euclidean length before clustering.
        forward: ``forward(model, batch)`` runs the model on a batch, when ``model(batch[0])``
            does not.
    """
    chosen = (features,) if isinstance(features, str) else tuple(features)
    if not chosen or any(f not in FEATURES for f in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"features must be a non-empty subset of {FEATURES}, got {features!r}.")
    if signs not in ("absolute", "keep", "align"):
        raise ValueError(f"signs must be 'absolute', 'keep' or 'align', got {signs!r}.")
    weights = chain_weights(model, None, include)
    names = tuple(weights)
    if len(names) < 2:
        raise ValueError(
            f"hierarchical_modules clusters hidden units, so the chain needs at least two weights; "
            f"got {list(names)}. Select an MLP's layers with `include=`."
        )
    with_inputs, with_outputs, spread = _correlations(model, data, names, forward or _run)
    dead = spread <= 1e-12
    clustered = (~dead).nonzero().flatten()
    if clustered.numel() < 2:
        raise ValueError(
            f"Only {clustered.numel()} of {dead.numel()} hidden units vary over `data`; "
            "clustering needs at least 2. Pass more varied data."
        )
    parts = {"input": with_inputs, "output": with_outputs}
    vectors = torch.cat([parts[f] for f in chosen], dim=1)[clustered]
    if signs == "absolute":
        vectors = vectors.abs()
    elif signs == "align":
        largest = vectors.gather(1, vectors.abs().argmax(1, keepdim=True))
        vectors = vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)
    if normalize:
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return HierarchicalModules(
        linkage=ward_linkage(vectors),
        clustered=clustered,
        features=vectors,
        input_correlation=with_inputs,
        output_correlation=with_outputs,
        dead=dead,
        layers=names[:-1],
        layer_sizes=tuple(weights[n].shape[0] for n in names[:-1]),
        weight_names=names,
    )


def plot_dendrogram(
    result: HierarchicalModules,
    n_modules: int | None = None,
    *,
    path: str | None = None,
    unit_names: Mapping[int, str] | None = None,
) -> Any:
    """The Ward tree of :func:`hierarchical_modules` as a dendrogram (``[plots]`` extra).

    With ``n_modules``, the links inside each module are coloured by module and a dashed line
    marks the cut; a strip under the leaves shows each unit's hidden layer. ``unit_names``
    labels chosen leaves (keys: positions in ``result.clustered``). Returns the figure.
    """
    from .plots import _finish, _pyplot

    plt = _pyplot()
    linkage = result.linkage.cpu()
    n = linkage.shape[0] + 1
    order = leaf_order(linkage)
    x = torch.empty(2 * n - 1, dtype=torch.float64)
    x[torch.tensor(order)] = torch.arange(n, dtype=torch.float64)
    y = torch.zeros(2 * n - 1, dtype=torch.float64)
    labels = cut_linkage(linkage, n_modules) if n_modules else None
    colours = plt.get_cmap("tab10")
    node_module = torch.full((2 * n - 1,), -1)
    if labels is not None:
        node_module[:n] = labels
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, n / 12)), 4))
    for step, (a, b, height, _) in enumerate(linkage.tolist()):
        a, b, node = int(a), int(b), n + step
        x[node], y[node] = (x[a] + x[b]) / 2, height
        same = node_module[a] == node_module[b] and node_module[a] >= 0
        node_module[node] = node_module[a] if same else -1
        colour = colours(int(node_module[node]) % 10) if same else "0.35"
        ax.plot([x[a], x[a], x[b], x[b]], [y[a], height, height, y[b]], color=colour, lw=0.8)
    if labels is not None and 1 < n_modules < n:
        below, above = linkage[n - n_modules - 1, 2], linkage[n - n_modules, 2]
        ax.axhline(float(below + above) / 2, ls="--", c="k", lw=0.8)
    layer_of = torch.repeat_interleave(
        torch.arange(len(result.layers)), torch.tensor(result.layer_sizes)
    )[result.clustered.cpu()]
    top = float(linkage[:, 2].max()) if n > 1 else 1.0
    ax.scatter(
        x[:n], torch.full((n,), -0.03 * top), c=layer_of.tolist(), cmap="viridis", marker="s", s=8
    )
    if unit_names is not None:
        ax.set_xticks([x[u] for u in unit_names], list(unit_names.values()), rotation=90)
    else:
        ax.set_xticks([])
    ax.set_xlabel(f"{n} hidden units (strip: layer, {' / '.join(result.layers)})")
    ax.set_ylabel("Ward merge height")
    ax.set_title(
        "Hierarchical modules (Watanabe et al. 2019)"
        + (f", cut into {n_modules}" if n_modules else "")
    )
    return _finish(fig, path)


__all__ = [
    "HierarchicalModules",
    "cut_linkage",
    "hierarchical_modules",
    "leaf_order",
    "plot_dendrogram",
    "ward_linkage",
]
