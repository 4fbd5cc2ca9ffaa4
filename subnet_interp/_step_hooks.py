"""Mask optimiser steps taken inside backward: no full set of mask gradients is ever held.

Plain training keeps every mask parameter's gradient (4 bytes per masked weight in fp32) from
backward until the optimiser steps. When a step has a single backward pass, the method has no
gradient clipping and its penalty is a sum of per-target terms (``penalty_separable``), each
target's mask can instead be stepped as soon as its gradient is complete: a post-accumulate-grad
hook adds that target's own penalty gradient, steps the optimiser (the other parameters have no
gradient at that moment, so only this one moves) and frees the gradient.

The arithmetic is the plain path's: the task gradient first, then the penalty's added to it, then
the same optimiser update, so masks and scores are bit-identical (tested). Targets the task loss
does not reach are stepped after backward in the same way.

A method that trains the weights with the mask (Savarese et al.'s continuous sparsification)
steps each weight the same way, as soon as its gradient is complete, so neither the weights' nor
the masks' full set of gradients is held. A weight the loss does not reach has no gradient and
is not stepped, as in the plain path.

Each of those steps shows its optimiser only the one parameter it updates (:func:`step_alone`),
so a step costs the same however many targets the run has, not a scan over all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _loop


def eligible(plan: Any, run: Any) -> bool:
    """Whether a run's mask optimiser (and weight optimiser, for a method that trains the
    weights too) may step inside backward.

    Not where two trained weights share storage (a TransformerLens bridge's q / k / v views of
    GPT-2's fused ``c_attn``, trained in place): stepping one in place would change a tensor
    the other's backward still reads."""
    context, method = plan.context, plan.method
    weights = (
        [p for group in run.weight_optimizer.param_groups for p in group["params"]]
        if run.weight_optimizer is not None
        else []
    )
    return (
        plan.clip is None
        and plan.world is None
        and context.mesh is None
        and method.penalty_separable()
        and not _share_storage(weights)
    )


def _share_storage(tensors: list[Tensor]) -> bool:
    seen: set[int] = set()
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        address = tensor.untyped_storage().data_ptr()
        if address in seen:
            return True
        seen.add(address)
    return False


def step_alone(
    optimizer: torch.optim.Optimizer, group: dict, param: Tensor, watch: _loop.FiniteWatch
) -> None:
    """Step ``optimizer`` on ``param`` alone (of its param group ``group``).

    The optimiser sees a copy of that group holding only ``param`` for the length of the step:
    its state (kept per parameter) and hyper-parameters are the group's, so the update is the
    one a full step makes to a parameter that alone has a gradient, without the full step's pass
    over every parameter of the run (quadratic in the number of targets over a backward pass).
    """
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [param]}]
    try:
        _loop.step_while_finite(optimizer, watch)
    finally:
        optimizer.param_groups = groups


def _groups(optimizer: torch.optim.Optimizer) -> dict[Tensor, dict]:
    return {param: group for group in optimizer.param_groups for param in group["params"]}


class HookedSteps:
    """The post-accumulate-grad hooks of one run's mask parameters; they act only while armed
    (around the one backward pass of a step)."""

    def __init__(self, plan: Any, run: Any):
        self.plan, self.run = plan, run
        self.armed = False
        self.stepped: set[str] = set()
        self.penalties: list[Tensor] = []
        self.weights = dict(zip(plan.names, plan.per_gate, strict=True))
        self.groups = _groups(run.optimizer)
        self.handles = [
            param.register_post_accumulate_grad_hook(self._hook(name))
            for name, param in run.params.items()
        ]
        if run.weight_optimizer is not None:  # each weight steps once its gradient is complete
            self.weight_groups = _groups(run.weight_optimizer)
            self.handles += [
                param.register_post_accumulate_grad_hook(self._weight_hook)
                for group in run.weight_optimizer.param_groups
                for param in group["params"]
            ]

    def arm(self) -> None:
        """Step each mask in the next backward pass, as its gradient completes."""
        self.armed, self.stepped, self.penalties = True, set(), []

    def disarm(self) -> None:
        self.armed = False

    def _hook(self, name: str):
        def hook(param: Tensor) -> None:
            if self.armed:
                self._step(name, param)

        return hook

    def _weight_hook(self, param: Tensor) -> None:
        """Step the weight optimiser on this weight alone and free its gradient. Every node
        that reads the weight has run by now (it gives the weight its gradient), so the update
        in place changes nothing backward still needs."""
        if self.armed:
            optimizer = self.run.weight_optimizer
            step_alone(optimizer, self.weight_groups[param], param, self.plan.watch)
            param.grad = None

    def _step(self, name: str, param: Tensor) -> None:
        """Add this target's penalty gradient, step its optimiser, free its gradient."""
        run, method = self.run, self.plan.method
        with torch.enable_grad():
            penalty = method.penalty([param], [self.weights[name]], run.state)
        if penalty.requires_grad:
            (gradient,) = torch.autograd.grad(penalty, param)
            if param.grad is None:
                param.grad = gradient
            else:
                param.grad += gradient  # as a second backward pass would accumulate it
        self.penalties.append(penalty.detach())
        step_alone(run.optimizer, self.groups[param], param, self.plan.watch)
        param.grad = None
        self.stepped.add(name)

    def finish(self) -> Tensor:
        """After the armed backward: step the targets it did not reach; the step's penalty."""
        self.armed = False
        for name, param in self.run.params.items():
            if name not in self.stepped:
                self._step(name, param)
        return torch.stack(self.penalties).sum()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


__all__ = ["HookedSteps", "eligible", "step_alone"]
