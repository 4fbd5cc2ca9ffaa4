"""Circuit probing (Lepori, Pavlick & Serre 2023, "Uncovering Intermediate Variables in
Transformers using Circuit Probing"; code: mlepori1/Circuit_Probing on NeuroSurgeon).

A mask over the weights of ONE block (an attention or MLP sublayer, or any module whose output
is added to the residual stream) is trained so that the block's update at a chosen token
clusters by a hypothesised intermediate variable: the loss is the soft nearest-neighbour loss
(Frosst, Papernot & Hinton 2019) of the updates under the variable's labels, and nothing else
is trained (no probe). If the masked update then classifies held-out examples by 1-nearest
neighbour, the block computes the variable, and the subnetwork that computes it is the mask;
ablating that subnetwork and watching the model's task break tests whether the model uses it.

Their recipe, the defaults here (from their configs, ``src/configs/*/circuit_probing``):
``continuous_sparsification_lepori`` (NeuroSurgeon's ``ContSparse``: mask ``sigmoid(T * s)``,
``s`` from 0, ``T`` ramped geometrically to 200) at learning rate ``1e-3`` with L0 strength
``1e-6`` (:data:`LEPORI_CIRCUIT_PROBING`); cosine distances in the loss at temperature 1; a
1-nearest-neighbour classifier with cosine distance. They ramp ``T`` once per epoch over 90
epochs and use AdamW (weight decay 0.01 on the mask logits); here ``T`` ramps per step and the
method's optimiser (Adam) is used.

Measured on the test's residual MLP (``tests/test_circuit_probe.py``: the block writes
``h = (a + b) mod 3`` next to a random code of ``a`` and ``b``; 54 training pairs, 27 held-out;
300 steps, ``mask_init = 0.05``, loss temperature 0.3): held-out 1-NN accuracy 1.0 for ``h``
(the full block's update: 0.33, chance 0.30), keeping 4-8% of the block; removing it takes the
task from 1.0 to 0.33 while five random removals of as many weights leave it at 1.0; a random
labelling of the same pairs gets at most 0.6. At the paper's temperature 1 the same run keeps
part of the ``(a, b)`` code and reaches 0.78.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import adapters
from ._find import find, to_device
from ._hidden import device_of, evaluating, read_hidden
from ._masked import masked
from ._probe import IGNORE_INDEX, probe_seed, split_probe_batch
from ._subnetwork import Subnetwork
from ._types import Target
from .methods import random_like, registry
from .methods._base import MaskMethod, Method

LEPORI_CIRCUIT_PROBING = {"lr": 1e-3, "l0_lambda": 1e-6}
"""``continuous_sparsification_lepori`` hyper-parameters of Lepori et al.'s circuit probing
configs (mask learning rate ``1e-3``, L0 strength ``1e-6``; ``mask_init = 0`` and final
temperature 200 are the method's defaults)."""


@dataclasses.dataclass(frozen=True)
class CircuitAblation:
    """The ablation test of circuit probing: the model's task metric (higher is better) with
    the full model, with the found subnetwork's weights removed (the block's other weights
    and every other weight kept), and with as many random weights of the block removed,
    drawn from outside the subnetwork (NeuroSurgeon's "complement sampled" control)."""

    full: float
    ablated: float
    random_ablated: Tensor

    @property
    def effect(self) -> float:
        """``full - ablated``: how much removing the subnetwork hurts the task."""
        return self.full - self.ablated

    @property
    def random_mean(self) -> float:
        """Mean metric with random weights removed (``nan`` without controls)."""
        return float(self.random_ablated.mean()) if self.random_ablated.numel() else float("nan")


@dataclasses.dataclass(frozen=True)
class CircuitProbeResult:
    """What :func:`circuit_probe` found.

    Attributes:
        subnetwork: the mask over the block's weights.
        history: per logged step, ``loss`` (soft nearest-neighbour), ``penalty``, ``density``.
        knn_accuracy: 1-nearest-neighbour accuracy (cosine distance) of the masked update on
            the held-out data, with every training update as a reference.
        knn_accuracies: the same for every ``k`` asked (majority vote, ties to the nearest).
        one_shot_accuracy: Lepori et al.'s protocol: 1-NN with ONE training update per class
            as the references (``per_class=1`` in their ``knn_eval.py``), drawn at random.
        full_model_knn_accuracy: ``knn_accuracy`` of the unmasked block's update.
        chance: accuracy of always answering the training set's majority class.
        ablation: the ablation test, when a task metric was given.
        block: the module path whose output is the update; position: the token read.
    """

    subnetwork: Subnetwork
    history: Mapping[str, list[float]]
    knn_accuracy: float
    knn_accuracies: Mapping[int, float]
    one_shot_accuracy: float
    full_model_knn_accuracy: float
    chance: float
    ablation: CircuitAblation | None
    block: str
    position: int | None

    @property
    def density(self) -> float:
        """Fraction of the block's weights the subnetwork keeps."""
        return self.subnetwork.density()


# ---------------------------------------------------------------- the loss
def soft_nearest_neighbor_loss(
    updates: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"],
    temperature: float = 1.0,
) -> Float[Tensor, ""]:
    """Soft nearest-neighbour loss (Frosst, Papernot & Hinton 2019, Eq. 1) with cosine
    distances, as circuit probing uses it:

    ``L = -1/b * sum_i log( sum_{j != i, y_j = y_i} exp(-d_ij / T) / sum_{k != i} exp(-d_ik / T) )``

    with ``d_ij = 1 - cos(x_i, x_j)`` (Frosst et al. use the squared Euclidean distance;
    Lepori et al. the cosine one, at ``T = 1``). Low when every point's neighbours share its
    label. Points whose label occurs once in the batch have no same-class pair and are left out
    of the mean (Lepori et al. add 1e-5 to the numerator instead). A zero update has cosine 0
    to everything.
    """
    if updates.dim() != 2 or labels.shape != updates.shape[:1]:
        raise ValueError(
            f"Expected updates [n, d] and labels [n], got {tuple(updates.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
    unit = torch.nn.functional.normalize(updates.float(), dim=-1, eps=1e-12)
    logits = -(1.0 - unit @ unit.T) / temperature
    n = len(labels)
    self_pair = torch.eye(n, dtype=torch.bool, device=updates.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    same = (labels[:, None] == labels[None, :]) & ~self_pair
    has_pair = same.any(1)
    if not has_pair.any():
        raise ValueError(
            "No two examples of the batch share a label, so the soft nearest-neighbour loss is "
            "undefined; use larger batches (every class at least twice)."
        )
    numerator = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    denominator = torch.logsumexp(logits, dim=1)
    return -(numerator - denominator)[has_pair].mean()


# ------------------------------------------------------------ reading updates
def _updates_and_labels(
    update: Tensor, labels: Tensor, position: int | None, block: str
) -> tuple[Tensor, Tensor]:
    """One update vector per label: ``[batch, d]`` as is, ``[batch, seq, d]`` at
    ``position`` (labels ``[batch]``) or at every labelled token (labels ``[batch, seq]``,
    ``-100`` ignored)."""
    if update.dim() == 2 or (update.dim() == 3 and position is not None):
        vectors = update if update.dim() == 2 else update[:, position]
        if tuple(labels.shape) != tuple(vectors.shape[:1]):
            raise ValueError(
                f"The update of {block!r} read {'at position ' + str(position) if position is not None else ''} "
                f"is {tuple(vectors.shape)}, so labels must be [batch] = "
                f"[{vectors.shape[0]}], got {tuple(labels.shape)}."
            )
        keep = labels != IGNORE_INDEX
        return vectors[keep], labels[keep]
    if update.dim() == 3:
        if tuple(labels.shape) != tuple(update.shape[:2]):
            raise ValueError(
                f"The update of {block!r} is {tuple(update.shape)} ([batch, seq, d]); give "
                f"`position=` to read one token (labels [batch]) or token labels [batch, seq] = "
                f"{list(update.shape[:2])} with -100 where unlabelled; got {tuple(labels.shape)}."
            )
        keep = labels != IGNORE_INDEX
        return update[keep], labels[keep]
    raise ValueError(
        f"The output of {block!r} is {tuple(update.shape)}; circuit probing reads a [batch, d] "
        "or [batch, seq, d] update."
    )


def _read(model: Any, block: str, batch: Any, position: int | None) -> tuple[Tensor, Tensor]:
    inputs, labels = split_probe_batch(batch)
    update = read_hidden(model, block, inputs)
    return _updates_and_labels(update, labels.to(update.device), position, block)


def _collect(
    model: Any, subnetwork: Subnetwork | None, block: str, data: Iterable[Any], position: int | None
) -> tuple[Tensor, Tensor]:
    root = adapters.resolve(model).root(model)
    device = device_of(root)
    vectors, labels = [], []
    context = masked(model, subnetwork) if subnetwork is not None else contextlib.nullcontext()
    with torch.no_grad(), evaluating(root), context:
        for batch in data:
            v, y = _read(model, block, to_device(batch, device), position)
            vectors.append(v.float())
            labels.append(y.long())
    if not vectors or sum(len(y) for y in labels) == 0:
        raise ValueError("The data has no labelled examples (every label is -100, or it is empty).")
    return torch.cat(vectors), torch.cat(labels)


# -------------------------------------------------------------------- k-NN
def knn_predict(
    references: Float[Tensor, "n d"],
    reference_labels: Int[Tensor, " n"],
    queries: Float[Tensor, "m d"],
    k: int = 1,
) -> Int[Tensor, " m"]:
    """k-nearest-neighbour labels under cosine distance (as Lepori et al.'s ``knn_eval``):
    the majority label among the ``k`` nearest references, ties going to the label of the
    nearest tied neighbour."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(references):
        raise ValueError(
            f"`k` must be an int in 1 .. {len(references)} (the references), got {k!r}."
        )
    similarity = torch.nn.functional.normalize(queries, dim=-1, eps=1e-12) @ (
        torch.nn.functional.normalize(references, dim=-1, eps=1e-12).T
    )
    nearest = similarity.topk(k, dim=1).indices  # [m, k], nearest first
    votes_for = reference_labels[nearest]
    classes = int(reference_labels.max()) + 1
    counts = torch.nn.functional.one_hot(votes_for, classes).sum(1)  # [m, classes]
    # among the labels with the most votes, the one whose first vote is nearest
    rank = torch.arange(k, 0, -1, device=queries.device, dtype=torch.float32)
    first = torch.zeros_like(counts, dtype=torch.float32).scatter_reduce(
        1, votes_for, rank.expand_as(votes_for), reduce="amax"
    )
    return (counts.float() * (k + 1) + first).argmax(1)


def _one_shot(
    references: Tensor, labels: Tensor, queries: Tensor, generator: torch.Generator
) -> Tensor:
    picks = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        picks.append(members[torch.randint(len(members), (1,), generator=generator)])
    chosen = torch.cat(picks).to(references.device)
    return knn_predict(references[chosen], labels[chosen], queries, 1)


# -------------------------------------------------------------- the procedure
def _lepori_defaults(name: str, hparams: Mapping[str, Any]) -> Mapping[str, Any]:
    return LEPORI_CIRCUIT_PROBING if name == "continuous_sparsification_lepori" else {}


def _block_targets(model: Any, block: str, targets: Any) -> Any:
    """The default targets of ``block``: every default target whose real tensor belongs to the
    module at that path or one under it (``mlp`` -> ``mlp.0.weight``; Hugging Face
    ``transformer.h.0.mlp`` -> ``blocks.0.mlp.W_in``, ``W_out``)."""
    if not isinstance(block, str):
        raise TypeError(f"`block` must be a module path (str), got {block!r}.")
    if targets is not None:
        return targets
    available = adapters.resolve(model).all_targets(model)
    chosen = [
        name
        for name, target in available.items()
        if target.default and (target.module == block or target.module.startswith(block + "."))
    ]
    if not chosen:
        raise ValueError(
            f"No maskable weight lies under the module {block!r}; pass `targets=` with the "
            f"canonical names of the block's weights (e.g. 'blocks.0.mlp.*'), or a `block` that "
            f"owns weights. Available: {list(available)[:12]}."
        )
    return chosen


def _ablation_test(
    model: Any,
    subnetwork: Subnetwork,
    task_metric: Callable[[Any, Any], Tensor],
    task_data: Iterable[Any],
    controls: int,
    generator: torch.Generator,
) -> CircuitAblation:
    batches = list(task_data)
    if not batches:
        raise ValueError("`task_data` yielded no batches.")
    root = adapters.resolve(model).root(model)
    device = device_of(root)

    def evaluate() -> float:
        with torch.no_grad(), evaluating(root):
            values = [task_metric(model, to_device(b, device)) for b in batches]
        return float(torch.stack([torch.as_tensor(v).float() for v in values]).mean())

    full = evaluate()
    with masked(model, ~subnetwork):
        ablated = evaluate()
    randoms = []
    for _ in range(controls):
        try:
            control = random_like(subnetwork, generator, within=~subnetwork)
        except ValueError:  # the subnetwork keeps over half a target: draw anywhere
            control = random_like(subnetwork, generator)
        with masked(model, ~control):
            randoms.append(evaluate())
    return CircuitAblation(full, ablated, torch.tensor(randoms, dtype=torch.float64))


def circuit_probe(
    model: Any,
    block: str,
    data: Iterable[Any],
    *,
    eval_data: Iterable[Any],
    steps: int,
    method: str | Method = "continuous_sparsification_lepori",
    position: int | None = None,
    temperature: float = 1.0,
    targets: str | Iterable[str] | Mapping[str, Target] | None = None,
    ks: Sequence[int] = (1,),
    task_metric: Callable[[Any, Any], Tensor] | None = None,
    task_data: Iterable[Any] | None = None,
    random_ablations: int = 5,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **method_hparams: Any,
) -> CircuitProbeResult:
    """Circuit probing (Lepori, Pavlick & Serre 2023): train a mask over one block's weights
    so that the block's update clusters by the labels of a hypothesised intermediate variable.

    Args:
        model: any supported model (``block`` is a module path of its root module, e.g.
            ``"blocks.0.mlp"`` on a TransformerLens model, ``"transformer.h.0.mlp"`` on a
            Hugging Face GPT-2, ``"mlp"`` on your own ``nn.Module``).
        block: the module whose output is the residual-stream update probed (its first
            tensor output when it returns a tuple, as attention modules do).
        data: ``(inputs, labels)`` batches to train on (each label class at least twice per
            batch): ``labels`` ``[batch]`` with ``position`` (or a ``[batch, d]`` update), or
            ``[batch, seq]`` with ``-100`` where unlabelled.
        eval_data: held-out ``(inputs, labels)`` batches the k-NN accuracy is measured on (the
            training updates are the references).
        steps: optimisation steps (one batch each).
        method: a learnable-mask method; default Lepori et al.'s
            ``continuous_sparsification_lepori`` with :data:`LEPORI_CIRCUIT_PROBING`, which
            ``method_hparams`` override.
        position: the token whose update is read (e.g. ``-1``), for ``[batch]`` labels.
        temperature: of the soft nearest-neighbour loss (Lepori et al.: 1).
        targets: the weights to mask; default every default target whose weight belongs to
            ``block`` or a module under it.
        ks: the ``k`` of the k-NN accuracies reported in ``knn_accuracies`` (1 is the paper's).
        task_metric: ``fn(model, batch) -> scalar`` (higher is better, e.g. accuracy) for the
            ablation test, on ``task_data``; without it ``ablation`` is ``None``.
        random_ablations: how many density-matched random removals to compare with.
        generator: the source of all randomness (mask init and sampling, the one-shot
            references, the random ablations); default seed 0.
        **method_hparams: the method's hyper-parameters, e.g. ``lr=1e-2``.

    Returns:
        :class:`CircuitProbeResult`; the model is left bit-exactly as it was.
    """
    if (task_metric is None) != (task_data is None):
        raise ValueError(
            "Give both `task_metric` and `task_data` for the ablation test, or neither."
        )
    if not isinstance(random_ablations, int) or random_ablations < 0:
        raise ValueError(
            f"`random_ablations` must be a non-negative int, got {random_ablations!r}."
        )
    eval_data = list(eval_data)
    if not eval_data:
        raise ValueError(
            "`eval_data` is empty; give held-out (inputs, labels) batches to measure the k-NN "
            "accuracy on (the training updates are its references)."
        )
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    chosen = _block_targets(model, block, targets)
    resolved = registry.resolve(
        method,
        method_hparams,
        base=Method,
        defaults=_lepori_defaults,
        requires=MaskMethod,
        requires_why="Circuit probing trains a mask from the clustering loss, so it needs a "
        "learnable-mask method",
    )

    def loss_fn(probed: Any, batch: Any) -> Tensor:
        vectors, labels = _read(probed, block, batch, position)
        return soft_nearest_neighbor_loss(vectors, labels, temperature)

    found = find(
        model, resolved, loss_fn, data, targets=chosen, steps=steps,
        generator=torch.Generator().manual_seed(probe_seed(source)), progress=progress,
    )  # fmt: skip
    subnetwork = found.subnetwork
    train_x, train_y = _collect(model, subnetwork, block, data, position)
    test_x, test_y = _collect(model, subnetwork, block, eval_data, position)
    accuracies = {
        int(k): float((knn_predict(train_x, train_y, test_x, int(k)) == test_y).float().mean())
        for k in ks
    }
    knn = float((knn_predict(train_x, train_y, test_x, 1) == test_y).float().mean())
    picker = torch.Generator().manual_seed(probe_seed(source))
    one_shot = float((_one_shot(train_x, train_y, test_x, picker) == test_y).float().mean())
    full_x, full_y = _collect(model, None, block, data, position)
    full_test_x, _ = _collect(model, None, block, eval_data, position)
    full_knn = float((knn_predict(full_x, full_y, full_test_x, 1) == test_y).float().mean())
    majority = train_y.bincount().argmax()
    chance = float((test_y == majority).float().mean())
    ablation = None
    if task_metric is not None:
        ablation = _ablation_test(
            model, subnetwork, task_metric, task_data, random_ablations,
            torch.Generator().manual_seed(probe_seed(source)),
        )  # fmt: skip
    return CircuitProbeResult(
        subnetwork, found.history, knn, accuracies, one_shot, full_knn, chance, ablation,
        block, position,
    )  # fmt: skip


__all__ = [
    "LEPORI_CIRCUIT_PROBING",
    "CircuitAblation",
    "CircuitProbeResult",
    "circuit_probe",
    "knn_predict",
    "soft_nearest_neighbor_loss",
]
