"""What stands in for a weight where its mask is 0, for ``si.masked`` and ``ablation_effect``.

Zero ablation (the :class:`Ablation` base class), :class:`MeanAblation`,
:class:`ResampleAblation`, :class:`PatchAblation` and :class:`ReinitAblation`, and the input
recording the input-based ones need (at each weight's linear site, ``_sites.py``). They live
beside the attach code (``_attach.py``) that calls them; the public names are ``si.Ablation``,
``si.MeanAblation``, ... (also re-exported by ``si.analysis``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, no_type_check

import torch
from torch import Tensor, nn

from . import _moe_sites, _sites, adapters
from ._sites import masked_out_term, module_kind
from ._types import LinearSite, Target

if TYPE_CHECKING:
    from ._attach import _Slot


class Ablation:
    """What stands in for a weight where the mask is 0.

    ``apply(weight, mask, location)`` returns the weight the model computes with; ``mask`` is
    in the real tensor's layout and dtype. The base class is zero ablation: ``mask * weight``.
    Subclasses may compute statistics once per attach in :meth:`prepare` (the model is still
    unmasked then) and add terms outside the weight (e.g. a mean-input term) with forward hooks
    registered in :meth:`hooks`.
    """

    name = "zero"

    def prepare(self, model: object, root: nn.Module, targets: Mapping[str, Target]) -> None:
        """Called once per attach, before the masks are attached."""

    def hooks(self, root: nn.Module, slots: Mapping[tuple[str, str], _Slot]) -> list:
        """Register extra hooks once the masks are attached; returns their handles. If it
        raises, it must first remove the hooks it registered (``_sites.removed_on_error``)."""
        return []

    @no_type_check  # read inside torch.compile's traces (see _Masking.forward)
    def apply(self, weight: Tensor, mask: Tensor, location: tuple[str, str]) -> Tensor:
        """The weight the model computes with at ``location`` (module path, attribute), given
        its real ``weight`` and ``mask`` in the real tensor's layout: here ``weight * mask``."""
        return weight * mask

    def on_batch(self, batch: Any) -> None:
        """Called by ``si.find``, ``ablation_effect`` and ``faithfulness_curve`` before the model
        runs on each ``batch`` while attached (an ablation that depends on the batch, such as
        :class:`PatchAblation`, records what it needs here)."""

    def release(self) -> None:
        """Called once the attachment that prepared this ablation is removed."""

    def restart(self) -> None:
        """Called by ``ablation_effect`` and ``faithfulness_curve`` before each pass over their
        data (one configuration's measurement). An ablation that draws at random starts its
        draws again from where they started at construction, so every configuration of one
        call sees the same draws and a repeated call gives the same numbers."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


ZERO = Ablation()
_ABLATIONS: dict[str, Ablation] = {"zero": ZERO}


def resolve_ablation(ablation: str | Ablation) -> Ablation:
    if isinstance(ablation, Ablation):
        return ablation
    if isinstance(ablation, str) and ablation in _ABLATIONS:
        return _ABLATIONS[ablation]
    hint = {
        "mean": " Mean ablation needs reference data: si.MeanAblation(data).",
        "resample": " Resample ablation needs reference data: si.ResampleAblation(data).",
        "reinit": " Use si.ReinitAblation().",
        "patch": " Patching needs each batch's twin: si.PatchAblation(counterfactual).",
        "patching": " Patching needs each batch's twin: si.PatchAblation(counterfactual).",
    }.get(ablation if isinstance(ablation, str) else "", "")
    raise ValueError(
        f"Unknown ablation {ablation!r}. Pass one of {sorted(_ABLATIONS)} or an `si.Ablation` "
        f"instance.{hint}"
    )


Forward = Callable[[Any, Any], Any]


def _default_forward(model: Any, batch: Any) -> Any:
    return model(batch)


class _InputAblation(Ablation):
    """Shared machinery of mean and resample ablation: the masked-out weights see other inputs,
    recorded at each weight's linear site (the layer's input for an ``nn.Linear`` / ``Conv1D``;
    what the adapter names otherwise, e.g. a ``HookedTransformer`` attention's ``query_input``)."""

    _needs_input = True  # whether the hooks need the current input (resample: its shape)

    def __init__(self, data: Iterable[Any], forward: Forward | None = None):
        self.data = data
        self.forward = forward or _default_forward
        self._inputs: dict[tuple[str, str], Tensor] = {}
        self._sites: dict[tuple[str, str], LinearSite] = {}
        self._moe: _moe_sites.MoeInputs | None = None  # routers and fused experts

    def _capture(
        self, model: object, root: nn.Module, targets: Mapping[str, Target], keep_all: bool
    ) -> None:
        self._moe, targets = _moe_sites.split_moe(self, root, targets)
        self._sites = sites = _sites.linear_sites(self, model, root, targets)
        sums: dict[tuple[str, str], Any] = {}
        counts: dict[tuple[str, str], int] = {}

        def recorder(location, features):
            def record(x):
                x = x.detach()
                if keep_all:
                    sums.setdefault(location, []).append(x)
                else:  # the mean over every leading dimension, per feature
                    flat = x.reshape(-1, *x.shape[x.dim() - features :])
                    sums[location] = sums.get(location, 0) + flat.double().sum(0)
                    counts[location] = counts.get(location, 0) + flat.shape[0]

            return record

        handles = [
            _sites.input_hook(root, site, recorder(location, site.feature_dims))
            for location, site in sites.items()
        ]
        if self._moe is not None:
            mode = "resample" if keep_all else "mean"
            handles += self._moe.capture_hooks(root, mode, getattr(self, "generator", None))
        try:
            with torch.no_grad():
                seen = 0
                for batch in self.data:
                    try:
                        self.forward(model, batch)
                    except Exception as error:
                        if self.forward is not _default_forward or isinstance(batch, Tensor):
                            raise
                        raise ValueError(
                            f"{type(self).__name__} ran model(batch) on a reference batch of "
                            f"type {type(batch).__name__}, which failed ({type(error).__name__}: "
                            f"{error}). Pass forward=lambda model, batch: ... to say how the "
                            "model runs on one batch, e.g. model(**batch) or model(batch[0])."
                        ) from error
                    seen += 1
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            raise ValueError(f"{type(self).__name__}: the reference `data` yielded no batches.")
        for location, site in sites.items():
            if location not in sums:
                raise ValueError(
                    f"{type(self).__name__}: {site.input_module!r} was never called while "
                    "running the reference data; check `forward`."
                )
            if keep_all:
                self._inputs[location] = torch.cat(sums[location])
            else:
                weight = adapters.real_tensor(root.get_submodule(location[0]), location[1])
                self._inputs[location] = (sums[location] / counts[location]).to(weight.dtype)
        if self._moe is not None:
            self._moe.finish_capture(root)

    def hooks(self, root, slots):
        with _sites.removed_on_error([]) as handles:
            if self._moe is not None:
                handles += self._moe.hooks(root, slots, "resample" if self._needs_input else "mean")
            for location, slot in slots.items():
                if location not in self._sites:  # a router or fused experts (above)
                    continue
                hook = self._make_hook(root.get_submodule(location[0]), location, slot)
                handles += _sites.watch(
                    root, self._sites[location], hook, needs_input=self._needs_input
                )
        return handles

    def release(self) -> None:
        if self._moe is not None:
            self._moe.release()


class MeanAblation(_InputAblation):
    """Mean ablation: masked weights contribute their mean-input term,
    ``y = (m * W) x + ((1 - m) * W) E[x] + b``, with ``E[x]`` the mean input of each targeted layer
    over ``data`` on the unmasked model (computed once per attach). On a mixture-of-experts
    model (transformers 5's Mixtral / Qwen-MoE), the router's term is added to its logits
    before its softmax / top-k, and an expert's matrices see the means of their inputs over
    the reference tokens routed to that expert (a whole-expert mask gives each token routed to
    it the expert's mean output, times the token's routing weight).

    Args:
        data: reference batches.
        forward: ``forward(model, batch)`` runs the model on one batch (default ``model(batch)``).
    """

    name = "mean"
    _needs_input = False

    def prepare(self, model, root, targets) -> None:
        self._capture(model, root, targets, keep_all=False)

    def _make_hook(self, owner, location, slot):
        equation = self._sites[location].equation

        def hook(x, output):
            if slot.mask is None:
                return output
            mean = self._inputs[location]
            return output + masked_out_term(owner, location[1], equation, slot.mask, mean)

        return hook


class ResampleAblation(_InputAblation):
    """Resample ablation: masked weights see the input another example gave the same layer,
    ``y = (m * W) x + ((1 - m) * W) x' + b``, with ``x'`` drawn (per example, with ``generator``)
    from the unmasked model's inputs on ``data``. Reference inputs must have the current
    inputs' shape apart from the batch dimension (e.g. the same sequence length).
    ``ablation_effect`` and ``faithfulness_curve`` start the draws again from the generator's
    state at construction before each configuration they measure (:meth:`restart`), so the
    configurations of one call are compared on the same draws (the empty circuit scores
    faithfulness 0 exactly) and a repeated call gives the same numbers; ``si.find`` draws on
    through its steps. On a
    mixture-of-experts block one example is drawn per example for the router and all experts;
    an expert's ``W_out`` sees the expert's activation on the drawn input at the same position.
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
        self._start = self.generator.get_state()

    def restart(self) -> None:
        """Draw again from the generator's state at construction."""
        self.generator.set_state(self._start)

    def prepare(self, model, root, targets) -> None:
        self._capture(model, root, targets, keep_all=True)

    def _make_hook(self, owner, location, slot):
        equation = self._sites[location].equation
        where = repr(_sites.label(location))

        def hook(x, output):
            # drawn even where this layer keeps every weight, so each layer's draws are the
            # same whichever layers a configuration masks
            pool = self._inputs[location]
            index = _sites.resample_index(pool, x, self.generator, where)
            if slot.mask is None:
                return output
            twin = pool[index.to(pool.device)]
            return output + masked_out_term(owner, location[1], equation, slot.mask, twin)

        return hook


class ReinitAblation(Ablation):
    """Re-initialisation ablation (Lepori et al. 2023): masked weights are replaced by a fresh
    draw from the layer's initial distribution, ``W' = m * W + (1 - m) * R``. ``R`` is drawn once
    per attach with ``generator``, from its state at construction (so every attach, and a
    repeated analysis call, computes with the same ``R``): PyTorch's default for ``nn.Linear`` / convolutions
    (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), ``N(0, initializer_range)`` for transformers'
    ``Conv1D`` (GPT-2, 0.02 by default) and otherwise ``N(0, std(W))``.
    """

    name = "reinit"

    def __init__(self, generator: torch.Generator | None = None, initializer_range: float = 0.02):
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._start = self.generator.get_state()
        self.initializer_range = initializer_range
        self._draws: dict[tuple[str, str], Tensor] = {}

    def prepare(self, model, root, targets) -> None:
        self.generator.set_state(self._start)  # every attach draws the same R
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
            elif module_kind(module) == "conv1d":
                draw = torch.randn(shape, generator=self.generator) * self.initializer_range
            else:
                draw = torch.randn(shape, generator=self.generator) * float(weight.float().std())
            self._draws[location] = draw.to(device=weight.device, dtype=weight.dtype)

    def apply(self, weight, mask, location):
        """Kept weights as they are, removed ones replaced by this attach's fresh draw."""
        return weight * mask + self._draws[location] * (1 - mask)


__all__ = [
    "ZERO",
    "Ablation",
    "MeanAblation",
    "ReinitAblation",
    "ResampleAblation",
    "resolve_ablation",
]
