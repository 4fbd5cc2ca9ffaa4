"""Structural compositionality (Lepori, Serre & Pavlick 2023, "Break It Down: Evidence for
Structural Compositionality in Neural Networks"): find a subnetwork per subroutine, ablate it,
and measure every subtask against random ablations of the same size."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._ablations import Ablation
from .._subnetwork import Subnetwork
from .ablation import Metric, ablation_effect, as_metric, loss


@dataclass(frozen=True)
class Subtask:
    """One subtask of a compositional task.

    Attributes:
        loss_fn: ``loss_fn(model, batch) -> scalar``; what the subroutine's subnetwork is
            trained on (through :func:`~subnet_interp.find`).
        data: batches for finding the subnetwork.
        metric: what is measured (a :class:`~subnet_interp.analysis.Metric` such as
            ``accuracy(...)``, or a plain ``fn(model, batch)`` with ``higher_is_better``);
            default: the loss itself.
        eval_data: batches for measuring (default: ``data``).
        higher_is_better: only for a plain metric function.
    """

    loss_fn: Callable[[Any, Any], Tensor]
    data: Sequence[Any]
    metric: Metric | Callable[[Any, Any], Tensor] | None = None
    eval_data: Sequence[Any] | None = None
    higher_is_better: bool | None = None

    def resolved_metric(self) -> Metric:
        """The metric as a :class:`~subnet_interp.analysis.Metric`."""
        if self.metric is None:
            return loss(self.loss_fn)
        return as_metric(self.metric, self.higher_is_better)


@dataclass(frozen=True)
class AblationCell:
    """One cell of :class:`Compositionality`: subroutine ``ablated``'s subnetwork removed (its
    complement kept) and subtask ``measured`` evaluated.

    Attributes:
        full: the metric of the unablated model.
        ablated: the metric with the subnetwork removed.
        alone: the metric with only the subnetwork kept (the "does it perform the subroutine"
            check of the paper).
        controls: the metric with each density-matched random subnetwork removed instead.
    """

    ablated_subroutine: str
    measured: str
    metric: str
    higher_is_better: bool
    full: float
    ablated: float
    alone: float
    controls: Tensor

    def _worse(self, value: Tensor | float) -> Tensor:
        """How much worse than the full model ``value`` is (positive: worse)."""
        value = torch.as_tensor(value, dtype=torch.float64)
        return self.full - value if self.higher_is_better else value - self.full

    @property
    def damage(self) -> float:
        """How much worse the subtask gets when the subnetwork is removed (in metric units)."""
        return float(self._worse(self.ablated))

    @property
    def control_mean(self) -> float:
        """Mean damage of the random ablations."""
        return float(self._worse(self.controls).mean()) if self.controls.numel() else float("nan")

    @property
    def control_std(self) -> float:
        """Standard deviation of the random ablations' damage."""
        return (
            float(self._worse(self.controls).std()) if self.controls.numel() > 1 else float("nan")
        )

    @property
    def z(self) -> float:
        """``(damage - control mean) / control std``: positive when removing the subnetwork
        hurts more than removing as many random weights (``inf`` when the controls do not vary
        and the subnetwork does more damage)."""
        excess = self.damage - self.control_mean
        std = self.control_std
        if std != std:
            return float("nan")
        if std == 0:
            return 0.0 if excess == 0 else float("inf") if excess > 0 else float("-inf")
        return excess / std

    @property
    def p_value(self) -> float:
        """One-sided: ``(1 + #random ablations at least as damaging) / (1 + n)``; small when
        the subnetwork's removal hurts this subtask more than chance."""
        n = self.controls.numel()
        if not n:
            return float("nan")
        as_bad = int((self._worse(self.controls) >= self.damage).sum())
        return (1 + as_bad) / (1 + n)


@dataclass(frozen=True)
class Compositionality:
    """Result of :func:`compositionality`: a table of :class:`AblationCell`, one per
    (subroutine whose subnetwork is ablated, subtask measured).

    Structural compositionality (Lepori et al. 2023) shows as a table whose diagonal cells
    (a subroutine's own subtask) have large damage, positive ``z`` and small ``p``, while the
    off-diagonal cells stay near the full model.
    """

    subroutines: tuple[str, ...]
    subtasks: tuple[str, ...]
    cells: Mapping[tuple[str, str], AblationCell]
    subnetworks: Mapping[str, Subnetwork]
    control_kind: str = "random"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def cell(self, ablated: str, measured: str) -> AblationCell:
        """The cell of subroutine ``ablated``'s subnetwork removed, subtask ``measured``."""
        if (ablated, measured) not in self.cells:
            raise KeyError(
                f"No cell ({ablated!r}, {measured!r}); subroutines {list(self.subroutines)}, "
                f"subtasks {list(self.subtasks)}."
            )
        return self.cells[(ablated, measured)]

    def matrix(self, value: str = "damage") -> Tensor:
        """``[subroutines, subtasks]`` of one cell attribute (``"damage"``, ``"z"``,
        ``"p_value"``, ``"ablated"``, ``"full"``, ``"alone"``, ``"control_mean"``)."""
        return torch.tensor(
            [[float(getattr(self.cells[(s, t)], value)) for t in self.subtasks] for s in self.subroutines],
            dtype=torch.float64,
        )  # fmt: skip

    def __str__(self) -> str:
        header = (
            f"{'ablated':>12s} {'density':>7s} | {'measured':>12s} {'metric':>10s} "
            f"{'full':>9s} {'ablated':>9s} {'alone':>9s} {'random ablation':>19s} "
            f"{'z':>7s} {'p':>6s}"
        )
        lines = [
            "Structural compositionality (Lepori et al. 2023): each subroutine's subnetwork "
            "removed, every subtask measured",
            f"damage against {self.control_kind} density-matched ablations; z > 0 and small p: "
            "removing it hurts more than chance",
            header,
            "-" * len(header),
        ]
        for s in self.subroutines:
            density = self.subnetworks[s].density()
            for t in self.subtasks:
                c = self.cells[(s, t)]
                random_part = (
                    f"{float(c.controls.mean()):9.4g} ± {float(c.controls.std()):<7.3g}"
                    if c.controls.numel() > 1
                    else f"{'-':>19s}"
                )
                lines.append(
                    f"{s:>12s} {density:7.3g} | {t:>12s} {c.metric[:10]:>10s} {c.full:9.4g} "
                    f"{c.ablated:9.4g} {c.alone:9.4g} {random_part} {c.z:7.2f} {c.p_value:6.3f}"
                )
        return "\n".join(lines)


def _as_subtask(name: str, value: Any) -> Subtask:
    if isinstance(value, Subtask):
        return value
    if isinstance(value, tuple) and 2 <= len(value) <= 3:
        return Subtask(*value)
    raise TypeError(
        f"subtasks[{name!r}] must be a Subtask or a tuple (loss_fn, data[, metric]), got "
        f"{type(value).__name__}. Use si.analysis.Subtask(loss_fn, data, metric=..., "
        "eval_data=...) for the other options."
    )


def compositionality(
    model: Any,
    subtasks: Mapping[str, Any],
    *,
    method: Any = None,
    steps: int | None = None,
    subnetworks: Mapping[str, Subnetwork] | None = None,
    measure_only: Iterable[str] = (),
    controls: int = 20,
    ablation: str | Ablation = "zero",
    generator: torch.Generator | None = None,
    find_kwargs: Mapping[str, Any] | None = None,
) -> Compositionality:
    """Lepori, Serre & Pavlick (2023)'s test of structural compositionality, in one call.

    For every subroutine (each subtask not in ``measure_only``): its subnetwork is found with
    ``si.find(model, method, subtask.loss_fn, subtask.data, steps=steps)`` (or taken from
    ``subnetworks``); then it is ablated — removed, its complement kept, as their Figure 2(C)
    inverts the mask — and every subtask is measured, set against ``controls`` random
    subnetworks of the same size per weight matrix removed instead. The random masks are the
    same for every subtask of one subroutine, so the cells of a row are paired. Each cell also
    has the subnetwork kept alone (their Figure 2(B) check that it performs its subroutine).

    Args:
        model: any supported model (left unchanged).
        subtasks: name -> :class:`Subtask` or ``(loss_fn, data[, metric])``.
        method: a registered method name or instance for :func:`~subnet_interp.find`
            (Lepori et al. use ``"continuous_sparsification_lepori"``); not needed when
            ``subnetworks`` covers every subroutine.
        steps: optimisation steps for ``find``.
        subnetworks: subroutine name -> an already found subnetwork (not searched again).
        measure_only: subtasks only measured, never given a subnetwork (e.g. the whole
            compositional task).
        controls: random ablations per subroutine.
        ablation: what stands where a mask is 0 (``"zero"``, ``si.MeanAblation(data)``, ...).
        generator: randomness for the controls (and ``find``); default seed 0.
        find_kwargs: further keyword arguments to ``find`` (``progress``, ``device``, ...).
    """
    if not subtasks:
        raise ValueError("subtasks is empty; give at least one name -> (loss_fn, data).")
    tasks = {name: _as_subtask(name, value) for name, value in subtasks.items()}
    only = tuple(measure_only)
    given = dict(subnetworks or {})
    unknown = [n for n in (*only, *given) if n not in tasks]
    if unknown:
        raise ValueError(
            f"{unknown} named in measure_only / subnetworks are not subtasks; the subtasks are "
            f"{list(tasks)}."
        )
    routines = tuple(n for n in tasks if n not in only)
    if not routines:
        raise ValueError("Every subtask is measure_only: no subroutine has a subnetwork to ablate.")
    missing = [n for n in routines if n not in given]
    if missing and method is None:
        raise ValueError(
            f"No subnetwork given for {missing} and no `method` to find one: pass method= "
            "(e.g. 'continuous_sparsification_lepori') and steps=, or subnetworks={name: ...}."
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if missing:
        from .._find import find

        options = {"progress": False, **dict(find_kwargs or {})}
        for name in missing:
            task = tasks[name]
            found = find(
                model, method, task.loss_fn, task.data, steps=steps, generator=gen, **options
            )
            given[name] = found.subnetwork  # fmt: skip
    for name in routines:
        kept = sum(int(m.sum()) for m in given[name].masks.values())
        total = sum(m.numel() for m in given[name].masks.values())
        if controls and kept in (0, total):
            raise ValueError(
                f"The subnetwork of {name!r} keeps {kept} of {total} weights: removing it "
                f"removes {'nothing' if kept == 0 else 'everything'}, and random ablations of "
                "that size equal it. Find it with other hyper-parameters (or pass controls=0)."
            )
    cells = {}
    for name in routines:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        complement = ~given[name]
        for measured, task in tasks.items():
            report = ablation_effect(
                model,
                complement,
                task.resolved_metric(),
                task.eval_data if task.eval_data is not None else task.data,
                controls=controls,
                ablation=ablation,
                generator=torch.Generator().manual_seed(seed),
            )
            cells[(name, measured)] = AblationCell(
                ablated_subroutine=name,
                measured=measured,
                metric=report.metric,
                higher_is_better=report.higher_is_better,
                full=report.full,
                ablated=report.kept,  # the complement kept = the subnetwork removed
                alone=report.removed,  # the complement removed = the subnetwork alone
                controls=report.controls,
            )
    return Compositionality(
        subroutines=routines,
        subtasks=tuple(tasks),
        cells=cells,
        subnetworks={n: given[n] for n in routines},
    )


__all__ = ["AblationCell", "Compositionality", "Subtask", "compositionality"]
