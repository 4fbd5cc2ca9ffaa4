"""Patching (interchange) ablation with paired counterfactuals: :class:`PatchAblation`.

Beside the other ablations (``_ablations.py``); it reaches the model through the weights' linear
sites (``_sites.py``) like mean and resample ablation, plus a faster form for the layers that
are their own site while a mask trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import _moe_sites, _sites
from ._ablations import Ablation, Forward
from ._sites import masked_out_term
from ._types import LinearSite

if TYPE_CHECKING:
    from ._attach import _Slot


class PatchAblation(Ablation):
    """Patching (interchange) ablation with paired counterfactuals: the masked-out weights compute
    on what their layer received in a run of the model on the batch's counterfactual twin,

        ``y = (m * W) x + ((1 - m) * W) x' + b``,

    with ``x'`` the layer's input in a no-grad forward of the model without this attachment's
    masks on the counterfactual (e.g. the IOI prompt with the names swapped). This is the
    interchange ablation that Edge Pruning (Bhaskar et al. 2024) trains under and MIB's circuit
    track judges with (``--ablation patching``, Mueller et al. 2025), at the level of weights:
    mask all ones is the clean model, mask all zeros gives every masked layer exactly its output
    in the counterfactual run. Gradients reach a soft mask through both terms. On a
    mixture-of-experts block the router's and experts' terms read the block's input in the
    twin's run at the same position (an expert's ``W_out``: the expert's activation on it), so
    a block masked whole gives exactly its output in the twin's run.

    Each batch needs its twin: ``si.find(..., ablation=)``, ``ablation_effect`` and
    ``faithfulness_curve`` call :meth:`record` with every batch before running the model on it.
    Inside ``si.masked`` call ``ablation.record(batch)`` yourself first.

    Cost: one no-grad forward of the twin per batch. While a mask trains on frozen
    ``nn.Linear`` / ``Conv1D`` weights (a mask that requires grad, weights that do not), those
    layers compute the same map as ``(m * W)(x - x') + y'`` with ``y' = W x' + b`` their output in
    the twin's run: one product per layer, as under zero ablation, so a training step costs one
    extra no-grad forward (only where no other hook watches the layer, which would see
    ``x - x'``). Elsewhere (binary masks in analysis, weights that train) it is the
    two-term form above, which gives the clean model bit-exactly at mask all ones; the two forms
    agree up to float rounding.

    Args:
        counterfactual: ``counterfactual(model, batch)`` runs ``model`` on the batch's
            counterfactual twin (e.g. ``lambda model, batch: model(batch["corrupted"])``); or a
            key or index, which runs ``model(batch[key])``. The twin must give each masked layer
            an input of the clean input's shape (the same sequence length).
    """

    name = "patch"

    def __init__(self, counterfactual: object):  # str | int | Forward, checked below
        if isinstance(counterfactual, (str, int)) and not isinstance(counterfactual, bool):
            key = counterfactual
            self.counterfactual: Forward = lambda model, batch: model(batch[key])  # noqa: E731
        elif callable(counterfactual):
            self.counterfactual = counterfactual
        else:
            raise TypeError(
                "PatchAblation(counterfactual) takes a function `(model, batch) -> output` that "
                "runs the model on the batch's counterfactual twin, or the key / index of the "
                f"twin's input in each batch; got {type(counterfactual).__name__}."
            )
        self._model: object = None
        self._sites: dict[tuple[str, str], LinearSite] = {}
        self._slots: Mapping[tuple[str, str], _Slot] = {}
        self._inputs: dict[tuple[str, str], list[Tensor]] = {}
        self._outputs: dict[tuple[str, str], list[Tensor]] = {}  # y' - b, own-site layers
        self._calls: dict[tuple[str, str], int] = {}
        self._pending: dict[tuple[str, str], tuple[bool, Tensor]] = {}
        self._recording = False
        self._moe: _moe_sites.MoeInputs | None = None  # routers and fused experts

    def prepare(self, model, root, targets) -> None:
        if self._slots:
            raise RuntimeError(
                "This PatchAblation is already in use by another attachment (e.g. a nested "
                "si.masked); give each attachment its own PatchAblation."
            )
        self._moe, targets = _moe_sites.split_moe(self, root, targets)
        self._sites = _sites.linear_sites(self, model, root, targets)
        self._model = model
        self._inputs, self._outputs, self._calls, self._pending = {}, {}, {}, {}

    def hooks(self, root, slots):
        self._slots = dict(slots)
        with _sites.removed_on_error([]) as handles:
            if self._moe is not None:
                handles += self._moe.hooks(root, slots, "patch")
            for location, slot in slots.items():
                if location not in self._sites:  # a router or fused experts (above)
                    continue
                site, owner = self._sites[location], root.get_submodule(location[0])
                if _own_site(site, location):
                    before = self._before(owner, location, slot)
                    handles.append(owner.register_forward_pre_hook(before))
                    handles.append(owner.register_forward_hook(self._after(owner, location, slot)))
                else:
                    handles += _sites.watch(root, site, self._general(owner, location, slot))
        return handles

    def release(self) -> None:
        if self._moe is not None:
            self._moe.release()
        self._slots, self._model, self._sites, self._moe = {}, None, {}, None
        self._inputs, self._outputs, self._calls, self._pending = {}, {}, {}, {}

    def on_batch(self, batch: Any) -> None:
        self.record(batch)

    def record(self, batch: Any) -> None:
        """Run the counterfactual twin of ``batch`` (no grad, this attachment's masks off) and
        keep what every masked layer received (and, for ``nn.Linear`` / ``Conv1D`` layers,
        gave) for the next forward passes."""
        if not self._slots:
            raise RuntimeError(
                "PatchAblation.record needs the ablation attached: call it inside "
                "`si.masked(model, subnetwork, ablation=this)` (si.find, ablation_effect and "
                "faithfulness_curve call it for you)."
            )
        saved = [(slot, slot.mask, slot.compute) for slot in self._slots.values()]
        for slot, _, _ in saved:
            slot.mask, slot.compute = None, None
        self._inputs = {location: [] for location in self._sites}
        self._outputs = {location: [] for location in self._sites}
        self._pending = {}
        self._recording = True
        if self._moe is not None:
            self._moe.start_recording()
        try:
            with torch.no_grad():
                self.counterfactual(self._model, batch)
        finally:
            self._recording = False
            missing = [] if self._moe is None else self._moe.stop_recording()
            for slot, mask, compute in saved:
                slot.mask, slot.compute = mask, compute
        missing += [_sites.label(loc) for loc, seen in self._inputs.items() if not seen]
        if missing:
            self._inputs = {}
            raise ValueError(
                f"PatchAblation: the counterfactual run never called {missing[:4]}; check that "
                "`counterfactual` runs the whole model."
            )
        self._calls = dict.fromkeys(self._inputs, 0)

    def _twin(self, location: tuple[str, str], x: Tensor) -> int:
        """The index of the twin's call that pairs with this call of the layer (a layer called k
        times per run pairs call i with call i mod k), after checking the shapes."""
        name = _sites.label(location)
        recorded = self._inputs.get(location)
        if not recorded:
            raise RuntimeError(
                f"PatchAblation has no counterfactual input for {name!r}: call "
                "`ablation.record(batch)` before running the model on `batch` (si.find, "
                "ablation_effect and faithfulness_curve do this for every batch)."
            )
        call = self._calls[location]
        self._calls[location] = call + 1
        index = call % len(recorded)
        if recorded[index].shape != x.shape:
            raise ValueError(
                f"PatchAblation at {name!r}: the counterfactual run gave this layer an input of "
                f"shape {tuple(recorded[index].shape)}, the clean run {tuple(x.shape)}. Pair "
                "each batch with a twin of the same shape (batch size and sequence length)."
            )
        return index

    def _before(self, owner: nn.Module, location: tuple[str, str], slot: _Slot):
        attribute = location[1]

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self._recording:
                self._inputs[location].append(args[0].detach())
                return None
            if slot.mask is None:
                return None
            x = args[0]
            index = self._twin(location, x)
            twin = self._inputs[location][index]
            weight = owner.parametrizations[attribute].original
            bias = getattr(owner, "bias", None)
            fast = (
                torch.is_grad_enabled()
                and slot.mask.requires_grad
                and not weight.requires_grad
                and not (isinstance(bias, Tensor) and bias.requires_grad)
                and _unobserved(module)
            )
            if fast:  # (m W)(x - x') + (W x' + b): one product per layer
                self._pending[location] = (True, self._outputs[location][index])
                return (x - twin, *args[1:])
            self._pending[location] = (False, twin)
            return None

        return hook

    def _after(self, owner: nn.Module, location: tuple[str, str], slot: _Slot):
        attribute, equation = location[1], self._sites[location].equation

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if self._recording:
                bias = getattr(owner, "bias", None)
                shifted = output if bias is None else output - bias
                self._outputs[location].append(shifted.detach())
                return output
            pending = self._pending.pop(location, None)
            if slot.mask is None or pending is None:
                return output
            fast, value = pending
            if fast:
                return output + value
            return output + masked_out_term(owner, attribute, equation, slot.mask, value)

        return hook

    def _general(self, owner: nn.Module, location: tuple[str, str], slot: _Slot):
        """Weights whose map the adapter describes (e.g. a HookedTransformer's ``W_Q``)."""
        attribute, equation = location[1], self._sites[location].equation

        def hook(x: Tensor, output: Tensor) -> Tensor:
            if self._recording:  # the twin's input at this weight's site
                self._inputs[location].append(x.detach())
                return output
            if slot.mask is None:
                return output
            twin = self._inputs[location][self._twin(location, x)]
            return output + masked_out_term(owner, attribute, equation, slot.mask, twin)

        return hook


def _unobserved(module: nn.Module) -> bool:
    """Whether only this ablation's two hooks watch ``module``: the faster form passes the
    layer ``x - x'``, which no other hook (a user's, nnsight's, a nested attachment's) may see."""
    return (
        len(module._forward_pre_hooks) == 1
        and len(module._forward_hooks) == 1
        and not nn.modules.module._global_forward_hooks
    )


def _own_site(site: LinearSite, location: tuple[str, str]) -> bool:
    """Whether the weight is an ``nn.Linear`` / ``Conv1D`` layer's own (input and output there)."""
    return (
        site.equation in (_sites.LINEAR, _sites.CONV1D)
        and site.input_module == site.output_module == location[0]
        and site.input_from == "input"
    )


__all__ = ["PatchAblation"]
