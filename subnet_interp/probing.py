"""Subnetwork probing (Cao, Sanh & Rush, NAACL 2021, "Low-Complexity Probing via Finding
Subnetworks").

Instead of training a large probe on frozen representations, subnetwork probing trains a weight
mask over the pretrained model jointly with a small probe that reads one layer's hidden state;
the probe's accuracy, set against how few weights the mask keeps, measures how readily the
model computes a property. Cao et al.'s recipe, the defaults here:

- the probe is linear (:class:`Probe` with ``hidden=None``), on the hidden state after block
  ``layer``, at token level (one label per token, ``-100`` ignored) or sequence level;
- the mask is one hard-concrete L0 gate per weight (Louizos et al. 2018: ``beta = 2/3``,
  ``gamma = -0.1``, ``zeta = 1.1``; the registered ``hard_concrete`` method) over the weight
  matrices of the blocks up to and including ``layer``, each gate starting at ``0.9``
  (``droprate_init = 1/6``), with Cao et al.'s penalty ``lambda * sum over matrices of the
  fraction of gates expected open``, ``lambda`` 0 for the first quarter of the steps and then
  linear to ``l0_lambda = 1`` over the next half (their schedule, ``lambda_ramp = (0.25, 0.5)``),
  and the mask's Adam at their learning rate ``0.2``; the model's weights stay frozen;
- the probe has its own Adam (``probe_lr``), trained from the same loss (``si.find``'s
  ``extra_parameters``).

Differences from their code: there is no learning-rate warm-up (theirs: linear over the first
10% of the steps) and no dropout on the representation, and
the probe's default learning rate is ``1e-3`` (theirs, ``5e-5``, is tuned for BERT-base and
thousands of steps). Any other learnable method can be named instead of ``hard_concrete``.

Their comparisons, here: :func:`train_probe` (the same probe on the full model, no mask),
:func:`reinitialized` (a random-init copy of the model, to run the same subnetwork probe on),
:func:`probe_baselines` (all three at once) and :func:`complexity_curve` (accuracy against the
density the mask keeps, over several sparsity strengths).

Data is an iterable of ``(inputs, labels)`` batches: ``inputs`` is a tensor passed to the model
positionally (token ids; pixel values for ViT) or a mapping of keyword arguments
(``input_ids``, ``attention_mask``, ...); ``labels`` is ``[batch, seq]`` (token level) or
``[batch]`` (sequence level).

Circuit probing (Lepori, Pavlick & Serre 2023; :func:`circuit_probe`) lives in
:mod:`subnet_interp._circuit_probe` and is re-exported here.

Hidden states are read in :mod:`subnet_interp._hidden` (where each family's adapter says the
blocks are), the probe, its loss and accuracy live in :mod:`subnet_interp._probe`; this module
holds the procedures and re-exports the rest. Nothing here imports transformers,
transformer_lens or nnsight.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import adapters
from ._circuit_probe import (
    LEPORI_CIRCUIT_PROBING,
    CircuitAblation,
    CircuitProbeResult,
    circuit_probe,
    knn_predict,
    soft_nearest_neighbor_loss,
)
from ._find import find, select_targets, to_device
from ._fingerprint import fingerprint
from ._hidden import CapturedHidden, capture_hidden, device_of, evaluating, read_hidden
from ._loop import endless
from ._masked import prepare
from ._probe import (  # noqa: F401  (IGNORE_INDEX, LEVELS and probe_features are re-exported)
    IGNORE_INDEX,
    LEVELS,
    Probe,
    check_level,
    cross_entropy,
    logits_and_labels,
    make_probe,
    probe_accuracy,
    probe_features,
    probe_loss,
    probe_seed,
    split_probe_batch,
)
from ._subnetwork import Subnetwork
from ._types import Target
from .methods import registry
from .methods._base import MaskMethod, Method

# Cao et al. 2021 (stevenxcao/subnetwork-probing): gates start at 0.9, i.e.
# log_alpha = logit((0.9 - gamma) / (zeta - gamma)) = log 5, which is hard_concrete's init for
# droprate_init = 1/6; mask Adam at lr 0.2; lambda 0 for the first quarter of training, then
# linear to its final value 1 over the next half
CAO_HARD_CONCRETE = {
    "droprate_init": 1.0 / 6.0,
    "lr": 0.2,
    "l0_lambda": 1.0,
    "lambda_ramp": (0.25, 0.5),
}
"""``hard_concrete`` hyper-parameters of Cao et al. 2021's subnetwork probing (gates starting at
0.9, mask learning rate 0.2, L0 strength ramped in over the middle half of training)."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """A trained probe and the subnetwork it reads through.

    Attributes:
        subnetwork: the mask found with the probe; ``None`` for a probe on the full model.
        probe: the trained :class:`Probe`.
        history: per logged step, ``loss`` (and the mask method's ``penalty``, ``density``, ...).
        accuracy: the probe's accuracy (through the subnetwork) on the evaluation data.
        layer: the block (or module path) whose output the probe reads.
        level: ``"token"`` or ``"sequence"``.
        position: for sequence level, the token read (``None``: mean over tokens).
    """

    subnetwork: Subnetwork | None
    probe: Probe
    history: Mapping[str, list[float]]
    accuracy: float
    layer: int | str
    level: str
    position: int | None = None

    @property
    def density(self) -> float:
        """Fraction of the masked weights kept (1.0 for a probe on the full model)."""
        return 1.0 if self.subnetwork is None else self.subnetwork.density()


@dataclasses.dataclass(frozen=True)
class ProbeBaselines:
    """Cao et al.'s comparison: the subnetwork probe on the pretrained model, the same probe
    trained on the full model (no mask), and the subnetwork probe on a random-init copy."""

    subnetwork: ProbeResult
    full_model: ProbeResult
    random_init: ProbeResult


def _default_targets(layer: int | str) -> list[str] | None:
    if isinstance(layer, str):
        return None
    return [f"blocks.{index}.*" for index in range(layer + 1)]


def _method(
    method: str | Method,
    model: Any,
    targets: Any,
    hparams: Mapping[str, Any],
) -> Method:
    def defaults(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        if name != "hard_concrete":
            return {}
        chosen = select_targets(prepare(model), targets)
        mean_size = sum(t.numel for t in chosen.values()) / len(chosen)
        # dataset_size = mean target size turns hard_concrete's penalty,
        # l0_lambda / dataset_size * (expected open gates), into
        # l0_lambda * sum over targets of their expected open fraction (exactly so for
        # equal-sized targets): Cao et al.'s per-matrix normalisation
        settings = {**CAO_HARD_CONCRETE, "dataset_size": max(1, round(mean_size))}
        if {**settings, **given}.get("target_density") is not None and "lambda_ramp" not in given:
            del settings["lambda_ramp"]  # the Lagrangian replaces the L0 penalty it ramps
        return settings

    return registry.resolve(
        method,
        hparams,
        base=Method,
        defaults=defaults,
        requires=MaskMethod,
        requires_why="Subnetwork probing trains the mask and the probe together, so it needs a "
        "learnable-mask method",
    )


def subnetwork_probe(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    method: str | Method = "hard_concrete",
    steps: int,
    level: str = "token",
    hidden: int | None = None,
    probe_lr: float = 1e-3,
    targets: str | Iterable[str] | Mapping[str, Target] | None = None,
    position: int | None = None,
    eval_data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **method_hparams: Any,
) -> ProbeResult:
    """Subnetwork probing (Cao, Sanh & Rush 2021): train a weight mask of the frozen ``model``
    jointly with a probe on the hidden state after block ``layer``.

    Args:
        model: a Hugging Face, TransformerLens or nnsight model (``layer`` an int), or any
            ``nn.Module`` (``layer`` the path of the module whose output to read).
        layer: the block whose output the probe reads (see :func:`capture_hidden`).
        data: ``(inputs, labels)`` batches, re-iterated as needed (see the module docstring).
        n_classes: number of classes of the labels.
        method: a learnable-mask method; ``"hard_concrete"`` (Cao et al.'s) gets their
            settings (``CAO_HARD_CONCRETE`` and the per-matrix penalty normalisation), which
            ``method_hparams`` override; other names take only ``method_hparams``.
        steps: optimisation steps (one batch each).
        level: ``"token"`` (labels ``[batch, seq]``, ``-100`` ignored) or ``"sequence"``
            (labels ``[batch]``).
        hidden: ``None`` for a linear probe (Cao et al.), or the width of a one-hidden-layer
            ReLU probe.
        probe_lr: learning rate of the probe's Adam.
        targets: the weights to mask; default: every weight matrix of blocks ``0 .. layer``
            (every default target for a string ``layer``).
        position: at sequence level, the token to read (e.g. ``0`` for BERT's ``[CLS]``,
            ``-1`` for the last); default: the mean over tokens (over ``attention_mask`` when
            ``inputs`` carries one).
        eval_data: where ``accuracy`` is measured; default ``data``.
        generator: the source of all randomness (probe init, mask init and sampling).
        progress: show a progress bar.
        **method_hparams: the method's hyper-parameters, e.g. ``l0_lambda=3.0``.

    Returns:
        :class:`ProbeResult`; the model is left bit-exactly as it was.
    """
    check_level(level, position)
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    probe = make_probe(model, layer, data, n_classes, hidden, probe_seed(source))  # checks layer
    chosen = targets if targets is not None else _default_targets(layer)
    resolved = _method(method, model, chosen, method_hparams)

    def loss_fn(probed: Any, batch: Any) -> Tensor:
        return probe_loss(probed, probe, layer, batch, level=level, position=position)

    found = find(
        model,
        resolved,
        loss_fn,
        data,
        targets=chosen,
        steps=steps,
        generator=source,
        progress=progress,
        extra_parameters=probe,
        extra_lr=probe_lr,
    )
    evaluation = eval_data if eval_data is not None else data
    accuracy = probe_accuracy(
        model, found.subnetwork, probe, layer, evaluation, level, position=position
    )
    return ProbeResult(found.subnetwork, probe, found.history, accuracy, layer, level, position)


def train_probe(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    steps: int,
    level: str = "token",
    hidden: int | None = None,
    lr: float = 1e-3,
    position: int | None = None,
    eval_data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    log_every: int = 10,
) -> ProbeResult:
    """The usual probe: train ``Probe`` alone with Adam on the full, frozen model's hidden
    state after block ``layer`` (Cao et al.'s comparison without a mask).

    Arguments as in :func:`subnetwork_probe`; the returned ``subnetwork`` is ``None``.
    """
    check_level(level, position)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    probe = make_probe(model, layer, data, n_classes, hidden, probe_seed(source))
    root = adapters.resolve(model).root(model)
    device = device_of(root)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    history: dict[str, list[float]] = {"step": [], "loss": []}
    batches = endless(data)
    with evaluating(root):
        for step in range(steps):
            inputs, labels = split_probe_batch(to_device(next(batches), device))
            with torch.no_grad():  # the model is frozen: no graph through it
                hidden_state = read_hidden(model, layer, inputs)
            loss = cross_entropy(
                *logits_and_labels(hidden_state, inputs, labels, probe, level, position)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == steps - 1:
                history["step"].append(float(step))
                history["loss"].append(float(loss.detach()))
    evaluation = eval_data if eval_data is not None else data
    accuracy = probe_accuracy(model, None, probe, layer, evaluation, level, position=position)
    return ProbeResult(None, probe, history, accuracy, layer, level, position)


# ------------------------------------------------------------------ baselines
def reinitialized(model: Any, generator: torch.Generator | None = None) -> Any:
    """A deep copy of ``model`` with freshly initialised weights (``model`` is untouched): the
    random-init control of Cao et al. 2021 (their "reset all", embeddings included).

    Uses the family's own initialisation (its adapter's ``reinitialize``): for a Hugging Face
    model (also inside a ``TransformerBridge`` or an nnsight wrapper) its ``init_weights()``
    (``_init_weights``: e.g. ``N(0, initializer_range)`` and GPT-2's scaled residual
    projections, norms to 1 and 0); for a legacy ``HookedTransformer`` or a TL-native bridge its
    ``init_weights()``; otherwise PyTorch's ``reset_parameters()`` of every module that has one.
    The draws come from ``generator`` (default: seed 0); the global RNG is left as it was.
    """
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    try:
        fresh = copy.deepcopy(model)
    except Exception as error:
        raise TypeError(
            f"reinitialized() works on a deep copy, but a {type(model).__qualname__} could not "
            f"be copied ({error}); pass the underlying module instead."
        ) from error
    adapter = adapters.resolve(fresh)
    root = adapter.root(fresh)
    devices = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(probe_seed(source))
        adapter.reinitialize(root)
    if fingerprint(fresh) == fingerprint(model):
        raise RuntimeError(
            f"Re-initialising the {type(root).__qualname__} left the weights it computes with "
            "unchanged; build a fresh model from its config instead."
        )
    return fresh


def probe_baselines(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    steps: int,
    level: str = "token",
    hidden: int | None = None,
    probe_lr: float = 1e-3,
    position: int | None = None,
    eval_data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **probe_options: Any,
) -> ProbeBaselines:
    """Cao et al.'s three probes on one task: the subnetwork probe on ``model``, a probe on the
    full model without a mask (:func:`train_probe`, same steps and learning rate) and the
    subnetwork probe on a random-init copy (:func:`reinitialized`).

    ``probe_options`` go to :func:`subnetwork_probe` (``method``, ``targets``, hyper-parameters).
    """
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = [probe_seed(source) for _ in range(3)]
    shared: dict[str, Any] = {
        "level": level,
        "hidden": hidden,
        "position": position,
        "eval_data": eval_data,
    }

    def gen(index: int) -> torch.Generator:
        return torch.Generator().manual_seed(seeds[index])

    pretrained = subnetwork_probe(
        model, layer, data, n_classes, steps=steps, probe_lr=probe_lr, generator=gen(0),
        progress=progress, **shared, **probe_options,
    )  # fmt: skip
    full = train_probe(
        model, layer, data, n_classes, steps=steps, lr=probe_lr, generator=gen(1), **shared
    )
    random_model = reinitialized(model, gen(2))
    random_init = subnetwork_probe(
        random_model, layer, data, n_classes, steps=steps, probe_lr=probe_lr, generator=gen(2),
        progress=progress, **shared, **probe_options,
    )  # fmt: skip
    return ProbeBaselines(pretrained, full, random_init)


def complexity_curve(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    strengths: Sequence[float],
    steps: int,
    hparam: str = "l0_lambda",
    generator: torch.Generator | None = None,
    **probe_options: Any,
) -> list[tuple[float, float]]:
    """Cao et al.'s accuracy-against-complexity curve: the subnetwork probe once per sparsity
    strength (``hparam``: ``l0_lambda`` for ``hard_concrete``, ``alpha`` for
    ``gumbel_sigmoid``, ...), each from the same seed.

    Returns ``(density, accuracy)`` per strength, in the order given; ``probe_options`` go to
    :func:`subnetwork_probe` (``eval_data``, ``level``, ``method``, ...).
    """
    if not strengths:
        raise ValueError("`strengths` is empty; give the sparsity strengths to sweep.")
    if hparam in probe_options:
        raise ValueError(f"`{hparam}` is swept by `strengths`; do not also pass it.")
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seed = probe_seed(source)
    points = []
    for strength in strengths:
        result = subnetwork_probe(
            model, layer, data, n_classes, steps=steps,
            generator=torch.Generator().manual_seed(seed), **{hparam: strength}, **probe_options,
        )  # fmt: skip
        points.append((result.density, result.accuracy))
    return points


__all__ = [
    "CAO_HARD_CONCRETE",
    "LEPORI_CIRCUIT_PROBING",
    "CapturedHidden",
    "CircuitAblation",
    "CircuitProbeResult",
    "circuit_probe",
    "knn_predict",
    "soft_nearest_neighbor_loss",
    "Probe",
    "ProbeBaselines",
    "ProbeResult",
    "capture_hidden",
    "complexity_curve",
    "probe_accuracy",
    "probe_baselines",
    "probe_loss",
    "read_hidden",
    "reinitialized",
    "subnetwork_probe",
    "train_probe",
]
