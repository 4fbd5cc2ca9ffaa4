"""Shared pieces of the methods that train weights (lottery tickets, LT-SFT): the weight-training
loop, and the weights and masks it works with. The plumbing it shares with the mask loop (loss
checks, the non-finite stop, the progress bar) is in ``subnet_interp._loop``."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _loop
from .._attach import ZERO, Attachment
from .._fingerprint import canonical_copy
from .._subnetwork import Subnetwork
from ..adapters import real_tensor
from ._base import FindContext


def canonical_weights(context: FindContext) -> dict[str, Tensor]:
    """Copies of the targets' current weights, in canonical layout."""
    return canonical_copy(context.root, context.targets)


_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original(?=$|\.)")


def plain_state_dict(root: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of ``root.state_dict()`` with the keys it has when no mask is attached."""
    state = {}
    for key, value in root.state_dict().items():
        state[_PARAMETRIZED.sub(r"\1\2", key)] = value.detach().clone()
    return state


def load_plain_state_dict(root: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a :func:`plain_state_dict` into ``root``, whose weights may carry another
    attachment's parametrization now (``si.find`` inside ``si.masked``): each of ``root``'s
    keys reads the plain key it stands for."""
    keys = root.state_dict().keys()
    root.load_state_dict({key: state[_PARAMETRIZED.sub(r"\1\2", key)] for key in keys})


def real_location_masks(
    context: FindContext, masks: Mapping[str, Tensor], fill: float
) -> dict[int, Tensor]:
    """Canonical masks written into real-tensor-shaped buffers, keyed by ``id(parameter)``.

    Regions of a real tensor no target covers get ``fill``.
    """
    out: dict[int, Tensor] = {}
    for name, target in context.targets.items():
        real = real_tensor(context.root.get_submodule(target.module), target.attribute)
        buffer = out.get(id(real))
        if buffer is None:
            buffer = torch.full(real.shape, fill, dtype=real.dtype, device=real.device)
        buffer = target.layout.write_real(masks[name].to(real.dtype), buffer)
        out[id(real)] = buffer
    return out


def _gradient_mask(mask: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        return grad * mask

    return hook


def _current_subnetwork(
    context: FindContext, keep: Mapping[str, Tensor] | None, trainable: Mapping[str, Tensor] | None
) -> Subnetwork:
    """The subnetwork a weight-training run stands for: the kept or trainable weights (all
    weights if neither is given)."""
    current = keep if keep is not None else trainable
    if current is None:
        current = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in context.targets.items()}
    return Subnetwork(dict(current))


def train_weights(
    context: FindContext,
    steps: int,
    make_optimizer: Callable[[Sequence[Tensor]], torch.optim.Optimizer],
    *,
    keep: Mapping[str, Tensor] | None = None,
    trainable: Mapping[str, Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    description: str = "train",
) -> Tensor:
    """Train the model's weights for ``steps`` on ``context.batches``; returns the mean loss
    of the last ``log_every`` steps (a 0-dim tensor, no host sync).

    Args:
        keep: canonical bool masks; weights outside them are removed from the forward pass
            as ``context.ablation`` says (zero ablation: as a pruned network computes; other
            ablations: they keep their values and compute on the ablation's input).
        trainable: canonical bool masks; only these entries of the targets receive gradient
            updates, every other parameter is frozen (gradient masking, as in LT-SFT).
    """
    root = context.root
    params, hooks = _trained_parameters(context, trainable)
    if keep is not None and context.ablation is not ZERO:
        # removed weights still compute (on the mean / counterfactual input): they keep their
        # values, as a pruned weight keeps its zero under zero ablation
        hooks += _freeze_removed(context, keep, params)
    flags = {id(p): p.requires_grad for p in root.parameters()}
    chosen = {id(p) for p in params}
    for p in root.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = make_optimizer(params)
    attachment = None
    if keep is not None:
        attachment = Attachment(
            root, context.targets, context.ablation, adapter=context.adapter, model=context.model
        )
        attachment.set_masks(keep)
    recent: list[Tensor] = []
    watch = _loop.FiniteWatch()
    bar = _loop.progress_bar(steps, description, show=context.progress)
    try:
        for step in range(steps):
            recent.append(_weight_step(context, optimizer, step, watch, attachment))
            if len(recent) > context.log_every:
                recent.pop(0)
            if step % context.log_every == 0 or step == steps - 1:  # the host reads it here only
                watch.check(lambda: _current_subnetwork(context, keep, trainable))
            if on_step is not None:
                on_step(step)
            bar.update(1)
    finally:
        bar.close()
        if attachment is not None:
            attachment.remove()
        for handle in hooks:
            handle.remove()
        for p in root.parameters():
            p.requires_grad_(flags.get(id(p), False))
    return torch.stack(recent).mean() if recent else torch.zeros(())


def _trained_parameters(
    context: FindContext, trainable: Mapping[str, Tensor] | None
) -> tuple[list[Tensor], list[Any]]:
    """The parameters to train and the hooks that mask their gradients: with ``trainable``,
    the targets' parameters, updated only where it is true; otherwise those requiring grad."""
    if trainable is None:
        return [p for p in context.root.parameters() if p.requires_grad], []
    grad_masks = real_location_masks(context, trainable, 0.0)
    params, hooks = [], []
    for p in context.root.parameters():
        if id(p) in grad_masks:
            params.append(p)
            hooks.append(p.register_hook(_gradient_mask(grad_masks[id(p)])))
    return params, hooks


def _freeze_removed(
    context: FindContext, keep: Mapping[str, Tensor], params: Sequence[Tensor]
) -> list[Any]:
    """Gradient hooks that leave the weights outside ``keep`` unchanged."""
    grad_masks = real_location_masks(context, keep, 1.0)
    trained = {id(p) for p in params}
    return [
        p.register_hook(_gradient_mask(grad_masks[id(p)]))
        for p in context.root.parameters()
        if id(p) in grad_masks and id(p) in trained
    ]


def _weight_step(
    context: FindContext,
    optimizer: torch.optim.Optimizer,
    step: int,
    watch: _loop.FiniteWatch,
    attachment: Attachment | None,
) -> Tensor:
    """One optimiser step on the next batch (skipped on the device once ``watch`` saw a
    non-finite loss); returns the (detached) loss."""
    batch = next(context.batches)
    if attachment is not None:
        attachment.on_batch(batch)
    loss = context.loss_fn(context.model, batch)
    _loop.check_loss(loss, step)
    watch.observe(loss, step, None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _loop.step_while_finite(optimizer, watch)
    return loss.detach()
