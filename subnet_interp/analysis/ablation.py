"""What stands where a mask is 0 (zero, mean, resample, re-initialisation), and
``ablation_effect``: keep / remove a subnetwork and compare it with random controls."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import adapters
from .._attach import Ablation, Attachment, check_fingerprint, resolve_ablation, validate_masks
from .._subnetwork import Subnetwork
from .._types import Target
from ..methods.random import random_like

Forward = Callable[[Any, Any], Any]


def _default_forward(model: Any, batch: Any) -> Any:
    return model(batch)


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if adapters.is_conv1d(module):
        return "conv1d"
    return "other"


def _masked_out_term(module: nn.Module, attribute: str, mask: Tensor, inputs: Tensor) -> Tensor:
    """``inputs`` through the masked-out part of the weight: ``((1 - m) * W)`` applied, no bias."""
    weight = module.parametrizations[attribute].original
    removed = weight * (1 - mask)
    if _module_kind(module) == "linear":
        return torch.nn.functional.linear(inputs, removed)
    return inputs @ removed  # transformers' Conv1D stores [in, out]


class _InputAblation(Ablation):
    """Shared machinery of mean and resample ablation: the masked-out weights see other inputs."""

    def __init__(self, data: Iterable[Any], forward: Forward | None = None):
        self.data = data
        self.forward = forward or _default_forward
        self._inputs: dict[tuple[str, str], Tensor] = {}

    def _capture(
        self, model: object, root: nn.Module, targets: Mapping[str, Target], keep_all: bool
    ) -> None:
        locations = {t.location for t in targets.values()}
        for module_path, attribute in locations:
            module = root.get_submodule(module_path)
            if attribute != "weight" or _module_kind(module) == "other":
                raise TypeError(
                    f"{type(self).__name__} needs each target to be the weight of an nn.Linear or "
                    f"transformers Conv1D layer (inputs are recorded there); {module_path!r}."
                    f"{attribute} belongs to a {type(module).__name__}. Use zero ablation or "
                    "ReinitAblation for it, or restrict the targets."
                )
        sums: dict[tuple[str, str], Any] = {}
        counts: dict[tuple[str, str], int] = {}
        handles = []

        def recorder(location):
            def hook(module, args):
                x = args[0].detach()
                if keep_all:
                    sums.setdefault(location, []).append(x)
                else:
                    flat = x.reshape(-1, x.shape[-1])
                    sums[location] = sums.get(location, 0) + flat.double().sum(0)
                    counts[location] = counts.get(location, 0) + flat.shape[0]

            return hook

        for location in locations:
            handles.append(
                root.get_submodule(location[0]).register_forward_pre_hook(recorder(location))
            )
        try:
            with torch.no_grad():
                seen = 0
                for batch in self.data:
                    self.forward(model, batch)
                    seen += 1
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            raise ValueError(f"{type(self).__name__}: the reference `data` yielded no batches.")
        for location in locations:
            if location not in sums:
                raise ValueError(
                    f"{type(self).__name__}: {location[0]!r} was never called while running the "
                    "reference data; check `forward`."
                )
            if keep_all:
                self._inputs[location] = torch.cat(sums[location])
            else:
                weight_dtype = root.get_submodule(location[0]).weight.dtype
                self._inputs[location] = (sums[location] / counts[location]).to(weight_dtype)

    def hooks(self, root, slots):
        handles = []
        for location, slot in slots.items():
            module = root.get_submodule(location[0])
            handles.append(module.register_forward_hook(self._make_hook(location, slot)))
        return handles


class MeanAblation(_InputAblation):
    """Mean ablation: masked weights contribute their mean-input term,
    ``y = (m * W) x + ((1 - m) * W) E[x] + b``, with ``E[x]`` the mean input of each targeted layer
    over ``data`` on the unmasked model (computed once per attach).

    Args:
        data: reference batches.
        forward: ``forward(model, batch)`` runs the model on one batch (default ``model(batch)``).
    """

    name = "mean"

    def prepare(self, model, root, targets) -> None:
        self._capture(model, root, targets, keep_all=False)

    def _make_hook(self, location, slot):
        def hook(module, args, output):
            if slot.mask is None:
                return output
            return output + _masked_out_term(module, location[1], slot.mask, self._inputs[location])

        return hook


class ResampleAblation(_InputAblation):
    """Resample ablation: masked weights see the input another example gave the same layer,
    ``y = (m * W) x + ((1 - m) * W) x' + b``, with ``x'`` drawn (per example, with ``generator``)
    from the unmasked model's inputs on ``data``. Reference inputs must have the current
    inputs' shape apart from the batch dimension (e.g. the same sequence length).
    """

    name = "resample"

    def __init__(
        self,
        data: Iterable[Any],
        forward: Forward | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(data, forward)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def prepare(self, model, root, targets) -> None:
        self._capture(model, root, targets, keep_all=True)

    def _make_hook(self, location, slot):
        def hook(module, args, output):
            if slot.mask is None:
                return output
            x = args[0]
            pool = self._inputs[location]
            if pool.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"ResampleAblation at {location[0]!r}: reference inputs have shape "
                    f"{tuple(pool.shape[1:])} per example but the model now gets "
                    f"{tuple(x.shape[1:])}; use reference data of the same shape (e.g. the same "
                    "sequence length)."
                )
            index = torch.randint(pool.shape[0], (x.shape[0],), generator=self.generator)
            return output + _masked_out_term(
                module, location[1], slot.mask, pool[index.to(pool.device)]
            )

        return hook


class ReinitAblation(Ablation):
    """Re-initialisation ablation (Lepori et al. 2023): masked weights are replaced by a fresh
    draw from the layer's initial distribution, ``W' = m * W + (1 - m) * R``. ``R`` is drawn once
    per attach with ``generator``: PyTorch's default for ``nn.Linear`` / convolutions
    (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), ``N(0, initializer_range)`` for transformers'
    ``Conv1D`` (GPT-2, 0.02 by default) and otherwise ``N(0, std(W))``.
    """

    name = "reinit"

    def __init__(self, generator: torch.Generator | None = None, initializer_range: float = 0.02):
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.initializer_range = initializer_range
        self._draws: dict[tuple[str, str], Tensor] = {}

    def prepare(self, model, root, targets) -> None:
        self._draws = {}
        for target in targets.values():
            location = target.location
            if location in self._draws:
                continue
            module = root.get_submodule(location[0])
            weight = getattr(module, location[1]).detach()
            shape = tuple(weight.shape)
            if (
                isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                and location[1] == "weight"
            ):
                fan_in = math.prod(shape[1:])
                draw = (torch.rand(shape, generator=self.generator) * 2 - 1) / math.sqrt(fan_in)
            elif _module_kind(module) == "conv1d":
                draw = torch.randn(shape, generator=self.generator) * self.initializer_range
            else:
                draw = torch.randn(shape, generator=self.generator) * float(weight.float().std())
            self._draws[location] = draw.to(device=weight.device, dtype=weight.dtype)

    def apply(self, weight, mask, location):
        return weight * mask + self._draws[location] * (1 - mask)


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
        return float(self.controls.mean()) if self.controls.numel() else float("nan")

    @property
    def control_std(self) -> float:
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
    if not isinstance(metric, Metric):
        if higher_is_better is None:
            raise ValueError(
                "A plain metric function needs `higher_is_better=True/False` (or pass "
                "si.analysis.loss(...), accuracy(...), kl_to_full(...), logit_difference(...))."
            )
        metric = Metric(
            metric, higher_is_better=higher_is_better, name=getattr(metric, "__name__", "metric")
        )
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
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    available = adapter.all_targets(model)
    validate_masks(model, subnetwork.masks, available, root)
    if strict and "fingerprint" in subnetwork.meta:
        check_fingerprint(model, subnetwork.meta["fingerprint"])
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    control_masks = [
        random_like(subnetwork, gen, within=~subnetwork if control_kind == "complement" else None)
        for _ in range(controls)
    ]
    references = None
    if metric.needs_reference:
        with torch.no_grad():
            references = [metric.forward(model, batch).detach() for batch in batches]

    def evaluate() -> float:
        values = []
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if metric.needs_reference:
                    values.append(metric.fn(model, batch, references[index]))
                else:
                    values.append(metric.fn(model, batch))
        return float(torch.stack([v.detach().float() for v in values]).mean())

    targets = {n: available[n] for n in subnetwork.masks}
    resolved = resolve_ablation(ablation)
    full = evaluate()
    attachment = Attachment(root, targets, resolved, adapter=adapter, model=model)
    try:
        empty_masks = {n: torch.zeros_like(m) for n, m in subnetwork.masks.items()}
        attachment.set_masks(empty_masks)
        empty = evaluate()
        attachment.set_masks(subnetwork.masks)
        kept = evaluate()
        attachment.set_masks((~subnetwork).masks)
        removed = evaluate()
        control_values = []
        for control in control_masks:
            attachment.set_masks(control.masks)
            control_values.append(evaluate())
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
    "ResampleAblation",
    "ablation_effect",
    "accuracy",
    "kl_to_full",
    "logit_difference",
    "loss",
]
