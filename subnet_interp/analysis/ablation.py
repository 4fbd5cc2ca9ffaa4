"""``ablation_effect``: keep / remove a subnetwork and compare it with random controls, the
metrics it measures and its report.

The ablations themselves (what stands where a mask is 0) live beside the attach code in
``subnet_interp/_ablations.py``; ``MeanAblation``, ``ResampleAblation``, ``ReinitAblation`` and
``PatchAblation`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._ablations import (
    Ablation,
    Forward,
    MeanAblation,
    ReinitAblation,
    ResampleAblation,
    resolve_ablation,
)
from .._attach import Attachment
from .._masked import prepare
from .._patching import PatchAblation
from .._subnetwork import Subnetwork
from ..methods.random import random_like


# -------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    """A task metric for :func:`ablation_effect`: ``fn(model, batch)`` -> scalar tensor, or
    ``fn(model, batch, reference)`` with the unmasked model's output when ``needs_reference``."""

    fn: Callable[..., Tensor]
    higher_is_better: bool
    name: str = "metric"
    needs_reference: bool = False
    forward: Forward | None = None


def loss(loss_fn: Callable[[Any, Any], Tensor]) -> Metric:
    """The task loss itself (lower is better)."""
    return Metric(loss_fn, higher_is_better=False, name="loss")


def accuracy(forward: Callable[[Any, Any], tuple[Tensor, Tensor]]) -> Metric:
    """Fraction of correct argmax predictions; ``forward(model, batch) -> (logits, labels)``."""

    def fn(model, batch):
        logits, labels = forward(model, batch)
        return (logits.argmax(-1) == labels).float().mean()

    return Metric(fn, higher_is_better=True, name="accuracy")


def kl_to_full(forward: Callable[[Any, Any], Tensor]) -> Metric:
    """Mean KL(full model || masked model) of the output distributions (lower is better);
    ``forward(model, batch) -> logits`` over the last axis."""

    def fn(model, batch, reference):
        logits = forward(model, batch)
        log_p = torch.log_softmax(reference.float(), -1)
        log_q = torch.log_softmax(logits.float(), -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    return Metric(
        fn, higher_is_better=False, name="kl_to_full", needs_reference=True, forward=forward
    )


def logit_difference(forward: Callable[[Any, Any], tuple[Tensor, Tensor, Tensor]]) -> Metric:
    """Mean logit of the correct answer minus the wrong one;
    ``forward(model, batch) -> (logits [N, vocab], correct [N], wrong [N])``. Its normalised
    value in the report is the "logit difference recovered"."""

    def fn(model, batch):
        logits, correct, wrong = forward(model, batch)
        picked = logits.gather(-1, torch.stack([correct, wrong], -1))
        return (picked[..., 0] - picked[..., 1]).mean()

    return Metric(fn, higher_is_better=True, name="logit_difference")


# ------------------------------------------------------- shared evaluation
def as_metric(
    metric: Metric | Callable[[Any, Any], Tensor], higher_is_better: bool | None
) -> Metric:
    """``metric`` as a :class:`Metric`; a plain function needs ``higher_is_better``."""
    if isinstance(metric, Metric):
        return metric
    if higher_is_better is None:
        raise ValueError(
            "A plain metric function needs `higher_is_better=True/False` (or pass "
            "si.analysis.loss(...), accuracy(...), kl_to_full(...), logit_difference(...))."
        )
    return Metric(
        metric, higher_is_better=higher_is_better, name=getattr(metric, "__name__", "metric")
    )


def evaluator(model: Any, metric: Metric, batches: list[Any]) -> Callable[[], float]:
    """A function giving the metric's mean over ``batches`` on ``model`` as it is when called
    (masks attached or not). A metric that needs a reference runs the unmasked model on every
    batch now, once, so call this before attaching masks."""
    references = None
    if metric.needs_reference:
        with torch.no_grad():
            references = [metric.forward(model, batch).detach() for batch in batches]

    def evaluate(attachment: Attachment | None = None) -> float:
        """The metric's mean; with ``attachment``, its ablation sees every batch first."""
        values = []
        if attachment is not None:
            attachment.ablation.restart()  # every configuration on the same random draws
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if attachment is not None:
                    attachment.on_batch(batch)
                if metric.needs_reference:
                    values.append(metric.fn(model, batch, references[index]))
                else:
                    values.append(metric.fn(model, batch))
        return float(torch.stack([v.detach().float() for v in values]).mean())

    return evaluate


# ------------------------------------------------------------- ablation_effect
@dataclass(frozen=True)
class AblationReport:
    """Result of :func:`ablation_effect` (all metric values are means over the data).

    Attributes:
        full, empty: the unmasked model and the model with every target ablated.
        kept: the model with only the subnetwork (its complement ablated).
        removed: the model with the subnetwork ablated (its complement kept).
        controls: the metric with each density-matched random control kept.
        faithfulness: ``(kept - empty) / (full - empty)``, as circuit benchmarks normalise.
        percentile: fraction of controls the subnetwork does at least as well as.
        p_value: ``(1 + #controls at least as good as the subnetwork) / (1 + n)``.
    """

    metric: str
    higher_is_better: bool
    full: float
    empty: float
    kept: float
    removed: float
    controls: Tensor
    control_kind: str
    faithfulness: float
    percentile: float
    p_value: float
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def control_mean(self) -> float:
        """Mean metric of the random controls (``nan`` without controls)."""
        return float(self.controls.mean()) if self.controls.numel() else float("nan")

    @property
    def control_std(self) -> float:
        """Standard deviation of the controls' metric (``nan`` with fewer than two)."""
        return float(self.controls.std()) if self.controls.numel() > 1 else float("nan")

    def __str__(self) -> str:
        lines = [
            f"{self.metric} ({'higher' if self.higher_is_better else 'lower'} is better)",
            f"  full model          {self.full:.4g}",
            f"  subnetwork kept     {self.kept:.4g}   faithfulness {self.faithfulness:.3f}",
            f"  subnetwork removed  {self.removed:.4g}",
            f"  empty               {self.empty:.4g}",
        ]
        if self.controls.numel():
            lines.append(
                f"  {self.controls.numel()} {self.control_kind} controls: {self.control_mean:.4g} ± "
                f"{self.control_std:.4g}; subnetwork percentile {self.percentile:.2f}, "
                f"p = {self.p_value:.3g}"
            )
        return "\n".join(lines)


def ablation_effect(
    model: Any,
    subnetwork: Subnetwork,
    metric: Metric | Callable[[Any, Any], Tensor],
    data: Iterable[Any],
    *,
    controls: int = 20,
    control_kind: str = "random",
    ablation: str | Ablation = "zero",
    higher_is_better: bool | None = None,
    generator: torch.Generator | None = None,
    strict: bool = True,
) -> AblationReport:
    """Measure a metric with the subnetwork kept, removed, and for random controls.

    Args:
        model: any supported model.
        subnetwork: the subnetwork to test.
        metric: a :class:`Metric` (``loss``, ``accuracy``, ``kl_to_full``, ``logit_difference``)
            or a plain ``fn(model, batch) -> scalar`` (then say ``higher_is_better``).
        data: evaluation batches (iterated once per configuration).
        controls: number of density-matched random controls (same kept count per target).
        control_kind: ``"random"`` (anywhere, NeuroSurgeon's "randomly sampled") or
            ``"complement"`` (drawn only from weights outside the subnetwork, NeuroSurgeon's
            "complement sampled"; needs density <= 0.5 in every target).
        ablation: what stands where a mask is 0 (``"zero"``, ``MeanAblation(data)``, ...).

    All configurations reuse one attachment (masks are swapped, nothing is re-validated), so
    the cost is one pass over ``data`` per configuration.
    """
    metric = as_metric(metric, higher_is_better)
    if control_kind not in ("random", "complement"):
        raise ValueError(f"control_kind must be 'random' or 'complement', got {control_kind!r}.")
    if not isinstance(controls, int) or controls < 0:
        raise ValueError(f"controls must be a non-negative int, got {controls!r}.")
    kept = sum(int(m.sum()) for m in subnetwork.masks.values())
    total = sum(m.numel() for m in subnetwork.masks.values())
    if controls and kept in (0, total):
        raise ValueError(
            f"The subnetwork keeps {'no' if kept == 0 else 'every'} weight ({kept} of {total}): "
            "density-matched random controls would equal it, so comparing with them means "
            "nothing. Pass controls=0 to measure it alone, or check how it was found."
        )
    batches = list(data)
    if not batches:
        raise ValueError("`data` yielded no batches.")
    prepared = prepare(
        model, subnetwork.masks, recorded_fingerprint=subnetwork.meta.get("fingerprint"),
        strict=strict,
    )  # fmt: skip
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    control_masks = [
        random_like(subnetwork, gen, within=~subnetwork if control_kind == "complement" else None)
        for _ in range(controls)
    ]
    evaluate = evaluator(model, metric, batches)
    resolved = resolve_ablation(ablation)
    full = evaluate()
    attachment = prepared.attachment(subnetwork.masks, resolved)
    try:
        empty_masks = {n: torch.zeros_like(m) for n, m in subnetwork.masks.items()}
        attachment.set_masks(empty_masks)
        empty = evaluate(attachment)
        attachment.set_masks(subnetwork.masks)
        kept = evaluate(attachment)
        attachment.set_masks((~subnetwork).masks)
        removed = evaluate(attachment)
        control_values = []
        for control in control_masks:
            attachment.set_masks(control.masks)
            control_values.append(evaluate(attachment))
    finally:
        attachment.remove()
    control_tensor = torch.tensor(control_values, dtype=torch.float64)
    denominator = full - empty
    faithfulness = (kept - empty) / denominator if denominator != 0 else float("nan")
    if metric.higher_is_better:
        as_good = (control_tensor >= kept).sum().item()
        beaten = (control_tensor <= kept).float().mean().item() if controls else float("nan")
    else:
        as_good = (control_tensor <= kept).sum().item()
        beaten = (control_tensor >= kept).float().mean().item() if controls else float("nan")
    p_value = (1 + as_good) / (1 + controls)
    return AblationReport(
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
        full=full,
        empty=empty,
        kept=kept,
        removed=removed,
        controls=control_tensor,
        control_kind=control_kind,
        faithfulness=faithfulness,
        percentile=beaten,
        p_value=p_value,
    )


__all__ = [
    "AblationReport",
    "MeanAblation",
    "Metric",
    "ReinitAblation",
    "PatchAblation",
    "ResampleAblation",
    "ablation_effect",
    "accuracy",
    "kl_to_full",
    "logit_difference",
    "loss",
]
