"""``faithfulness_curve``: the faithfulness of the top-scored weights at each circuit size, with
the MIB circuit-track scores CPR and CMD.

Definitions follow Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark"
(ICML 2025), circuit track, as computed by ``evaluate_area_under_curve`` in
``MIB_circuit_track/evaluation.py`` of the MIB circuit-track code (github.com/hannamw/
MIB-circuit-track; read in its public forks, e.g. aryamanarora/MIB-circuit-track):

- faithfulness ``f(C) = (m(C) - m(∅)) / (m(M) - m(∅))``: ``m(M)`` the full model, ``m(∅)`` every
  component ablated, ``m(C)`` only the circuit ``C`` kept (its complement ablated);
- circuits are the top ``k`` scored components for ``k`` a fraction of all scored components, at
  the fractions ``(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)``;
- CPR (circuit performance ratio, higher is better) is the trapezoid-rule area under ``f`` and
  CMD (circuit-model distance, lower is better) the area under ``|1 - f|``, both with the
  **fraction of components kept** as the x-axis on a *linear* scale (MIB's ``log_scale`` switch
  is off), over the sizes evaluated (no point at 0): a constant ``f = 1`` gives CPR ``0.999`` and
  CMD ``0`` on MIB's grid. As in MIB, each trapezoid of CMD averages ``|1 - f|`` at its two
  ends (it does not split a segment where ``f`` crosses 1).

Here the components are weights. Two differences from MIB, both forced by weight-level masks:
the count at a density is ``round(d * N)`` (MIB truncates, ``int(d * N)``), the count every exact-
size mask of this library uses; and the x-axis is the requested density ``d`` (as MIB integrates
over its nominal fractions), not the realised ``count / N``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._ablations import Ablation, resolve_ablation
from .._masked import prepare
from .._ranking import kept_count, ranks
from .._subnetwork import Subnetwork
from ..methods._base import FindResult
from .ablation import Metric, as_metric, evaluator

MIB_DENSITIES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The circuit sizes (fractions of scored components) at which MIB evaluates faithfulness."""


def faithfulness_areas(x: Sequence[float], f: Sequence[float]) -> tuple[float, float]:
    """``(CPR, CMD)`` of a faithfulness curve: trapezoid-rule areas under ``f`` and under
    ``|1 - f|`` over ``x`` (increasing circuit sizes as fractions in [0, 1]), as MIB computes
    them (see the module docstring). Fewer than two points give areas of 0."""
    x, f = [float(v) for v in x], [float(v) for v in f]
    if len(x) != len(f):
        raise ValueError(f"x and f must have the same length, got {len(x)} and {len(f)}.")
    if any(b <= a for a, b in zip(x, x[1:], strict=False)):
        raise ValueError(f"x must be strictly increasing, got {x}. Sort the curve's points.")
    cpr = cmd = 0.0
    for i in range(len(x) - 1):
        width = x[i + 1] - x[i]
        cpr += width * (f[i] + f[i + 1]) / 2
        cmd += width * (abs(1.0 - f[i]) + abs(1.0 - f[i + 1])) / 2
    return cpr, cmd


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Result of :func:`faithfulness_curve` (metric values are means over the data).

    Attributes:
        densities: the requested circuit sizes (fraction of the scored weights), increasing.
        counts: weights kept at each density (``round(d * total)``, summed over targets when
            ``per_target``).
        total: number of scored weights.
        values: the metric with only the top-``count`` weights kept.
        faithfulness: ``(value - empty) / (full - empty)`` (``nan`` if ``full == empty``).
        full, empty: the unmasked model and the model with every scored weight ablated.
    """

    metric: str
    higher_is_better: bool
    ablation: str
    densities: tuple[float, ...]
    counts: tuple[int, ...]
    total: int
    values: tuple[float, ...]
    faithfulness: tuple[float, ...]
    full: float
    empty: float

    @property
    def cpr(self) -> float:
        """MIB's circuit performance ratio: area under faithfulness vs density (higher is
        better)."""
        return faithfulness_areas(self.densities, self.faithfulness)[0]

    @property
    def cmd(self) -> float:
        """MIB's circuit-model distance: area under ``|1 - faithfulness|`` vs density (lower is
        better)."""
        return faithfulness_areas(self.densities, self.faithfulness)[1]

    def __str__(self) -> str:
        lines = [
            f"{self.metric} ({'higher' if self.higher_is_better else 'lower'} is better), "
            f"{self.ablation} ablation, {self.total} scored weights",
            f"  full {self.full:.4g}   empty {self.empty:.4g}",
            f"  {'density':>8} {'count':>10} {self.metric:>12} {'faithfulness':>12}",
        ]
        for d, c, v, f in zip(
            self.densities, self.counts, self.values, self.faithfulness, strict=True
        ):
            lines.append(f"  {d:>8.4g} {c:>10d} {v:>12.4g} {f:>12.3f}")
        lines.append(f"  CPR {self.cpr:.4f} (higher is better)   CMD {self.cmd:.4f} (lower)")
        return "\n".join(lines)


def _check_densities(densities: Iterable[float]) -> tuple[float, ...]:
    try:
        values = tuple(densities)
    except TypeError:
        raise TypeError(
            f"`densities` must be a sequence of numbers in [0, 1], got {densities!r}."
        ) from None
    bad = [d for d in values if isinstance(d, bool) or not isinstance(d, (int, float))]
    bad += [d for d in values if d not in bad and not (0 <= d <= 1)]
    if not values or bad:
        raise ValueError(
            f"`densities` must be a non-empty sequence of numbers in [0, 1] (fractions of the "
            f"scored weights), got {values!r}; offending: {bad!r}. For percentages divide by "
            "100, e.g. densities=[0.001, 0.01, 0.1, 1.0]."
        )
    values = tuple(float(d) for d in values)
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(
            f"`densities` must be strictly increasing (the areas integrate over them), got "
            f"{values!r}. Pass sorted(set(densities))."
        )
    return values


def faithfulness_curve(
    model: Any,
    scores: Mapping[str, Tensor] | FindResult,
    data: Iterable[Any],
    metric: Metric | Callable[[Any, Any], Tensor],
    *,
    densities: Sequence[float] = MIB_DENSITIES,
    ablation: str | Ablation = "zero",
    per_target: bool = False,
    higher_is_better: bool | None = None,
    strict: bool = True,
) -> FaithfulnessCurve:
    """Faithfulness of the top-scored weights at each density, and MIB's CPR / CMD.

    One ranking of ``scores`` (highest first, ties by position) gives every mask: the circuit at
    density ``d`` keeps the ``round(d * N)`` best-ranked weights. The masks are swapped on one
    attachment, as in :func:`ablation_effect`, so the cost is one pass over ``data`` per density
    plus the full and the empty model.

    Args:
        model: any supported model.
        scores: canonical target name -> float tensor of the target's shape (e.g.
            ``FindResult.scores``, or ``{n: m.float() for n, m in subnetwork.masks.items()}``),
            or a ``FindResult`` itself (its scores, and the fingerprint of the model it was
            found on, checked with ``strict``). Targets not in ``scores`` are left unmasked.
        data: evaluation batches (iterated once per configuration).
        metric: a :class:`Metric` or a plain ``fn(model, batch) -> scalar`` (then say
            ``higher_is_better``).
        densities: circuit sizes as fractions of the scored weights, strictly increasing.
            Default: MIB's sizes ``MIB_DENSITIES`` (0.1% ... 100%); at weight level even 0.1%
            is a sizeable circuit for any model worth studying, and the same grid keeps CPR /
            CMD comparable with MIB's.
        ablation: what stands where a mask is 0 (``"zero"``, ``MeanAblation(data)``, ...); the
            empty circuit is ablated the same way.
        per_target: keep ``round(d * n_t)`` weights in each target instead of the global top.
        strict: as in ``ablation_effect``: a ``FindResult``'s recorded model fingerprint must
            match ``model`` (a plain mapping of scores records none).

    Definitions (MIB, Mueller et al. 2025): see this module's docstring; CPR and CMD integrate
    over the density (linear x-axis) with the trapezoid rule.
    """
    metric = as_metric(metric, higher_is_better)
    points = _check_densities(densities)
    if isinstance(scores, Subnetwork):
        raise TypeError(
            "`scores` must be a mapping of target name -> float scores, got a Subnetwork. Pass "
            "{name: mask.float() for name, mask in subnetwork.masks.items()} (its weights "
            "first, ties broken by position) or FindResult.scores."
        )
    recorded = None
    if isinstance(scores, FindResult):
        if scores.scores is None:
            raise ValueError(
                "This FindResult has no scores (it was built without them); pass a mapping of "
                "target name -> float scores instead."
            )
        recorded = scores.subnetwork.meta.get("fingerprint")
        scores = scores.scores
    order = ranks(scores, per_target=per_target)  # checks the mapping, dtypes and NaNs
    batches = list(data)
    if not batches:
        raise ValueError("`data` yielded no batches.")
    # checks names, shapes, devices and (strict) the model the scores were found on
    prepared = prepare(model, scores, recorded_fingerprint=recorded, strict=strict)
    sizes = {name: value.numel() for name, value in scores.items()}
    total = sum(sizes.values())

    def masks_at(density: float) -> tuple[dict[str, Tensor], int]:
        if per_target:
            keep = {name: kept_count(n, density=density) for name, n in sizes.items()}
            return {name: order[name] < keep[name] for name in order}, sum(keep.values())
        keep_all = kept_count(total, density=density)
        return {name: rank < keep_all for name, rank in order.items()}, keep_all

    evaluate = evaluator(model, metric, batches)
    resolved = resolve_ablation(ablation)
    full = evaluate()
    attachment = prepared.attachment(list(scores), resolved)
    values, counts = [], []
    try:
        attachment.set_masks(
            {name: torch.zeros_like(r, dtype=torch.bool) for name, r in order.items()}
        )
        empty = evaluate(attachment)
        for density in points:
            masks, count = masks_at(density)
            attachment.set_masks(masks)
            values.append(evaluate(attachment))
            counts.append(count)
    finally:
        attachment.remove()
    denominator = full - empty
    faithfulness = tuple(
        (v - empty) / denominator + 0.0 if denominator != 0 else math.nan for v in values
    )
    return FaithfulnessCurve(
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
        ablation=getattr(resolved, "name", type(resolved).__name__),
        densities=points,
        counts=tuple(counts),
        total=total,
        values=tuple(values),
        faithfulness=faithfulness,
        full=full,
        empty=empty,
    )


__all__ = ["MIB_DENSITIES", "FaithfulnessCurve", "faithfulness_areas", "faithfulness_curve"]
