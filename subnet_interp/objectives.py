"""Reusable training objectives for ``si.find``: each returns a ``loss_fn(model, batch)``.

:func:`knowledge_critical`: Bayazit et al. 2024 ("Discovering Knowledge-Critical Subnetworks in
Pretrained Language Models", EMNLP 2024). A knowledge-critical subnetwork is a sparse set of
weights whose REMOVAL suppresses a target behaviour (their TargetKG) while the rest of the model
keeps its control behaviour (ControlKG, ControlLM). Their objective, for the remaining model
``f(x; m * theta)``:

- suppression: on target examples, ``KL(U || p_remaining)`` to the uniform distribution ``U``
  over the output classes (the remaining model should not know the answer, not a wrong one);
- maintenance: on control examples, ``KL(p_full || p_remaining)`` to the full model's outputs,
  computed once before training (no mask);
- sparsity: the critical subnetwork, ``1 - m``, should be small, i.e. the remaining model dense.

Convention, explicitly: ``si.find`` always learns the mask of the weights the model KEEPS. With
this objective that is the REMAINING model; the knowledge-critical subnetwork is its complement,
:func:`critical_subnetwork` (``~found.subnetwork``). Because a learnable method's own penalty
pushes the kept mask towards sparsity, the wrong direction here, the objective carries the
paper's sparsity term itself (``sparsity * (1 - kept fraction)``, the critical subnetwork's soft
density, read from the masked weights) and the method's own penalty should be switched off or
kept negligible (e.g. ``continuous_sparsification_lepori`` with ``l0_lambda=0``,
``gumbel_sigmoid`` with ``alpha=0``), with every gate starting kept (``mask_init > 0``;
``gumbel_sigmoid``'s ``init_logit = 2``), as a remaining model should. The kept fraction is read
as ``masked / original`` weight over the targets' non-zero weights, so train with the default
``ablation="zero"``; a weight that is exactly 0 has no gradient and keeps its initial gate.
Not supported on FSDP-sharded models (the kept fraction reads whole weights).

Measured on the test's two-task MLP (``tests/test_objectives.py``, 300 steps of
``continuous_sparsification_lepori(l0_lambda=0, mask_init=0.5)``, ``sparsity=0.3``): removing
the 18 critical weights takes the target task from 1.0 to 0.27 (chance 0.34) and keeps the
control task at 1.0; all 18 are target-task weights (precision 1.0, IoU 0.25: enough of them
to silence the task, not the whole pathway).

Not taken from the paper: its exact term weights and mask parametrisation (its text was not
reachable here); the three weights are arguments.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import adapters
from ._find import select_targets, to_device
from ._hidden import device_of, evaluating
from ._masked import prepare
from ._subnetwork import Subnetwork
from ._types import Target
from .methods._base import FindResult

Forward = Callable[[Any, Any], Tensor]


def _default_forward(model: Any, batch: Any) -> Tensor:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return getattr(output, "logits", output)


def suppression_loss(logits: Tensor) -> Tensor:
    """``KL(U || softmax(logits))`` over the last axis, averaged over the rest: 0 exactly when
    the model is uniformly unsure (Bayazit et al.'s suppression loss)."""
    log_q = torch.log_softmax(logits.float(), -1)
    classes = logits.shape[-1]
    return (-math.log(classes) - log_q.mean(-1)).mean()


def maintenance_loss(logits: Tensor, reference: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` over the last axis, averaged over the rest
    (Bayazit et al.'s maintenance loss, ``reference`` the full model's logits)."""
    log_p = torch.log_softmax(reference.float(), -1)
    log_q = torch.log_softmax(logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class KnowledgeCritical:
    """The objective :func:`knowledge_critical` returns: call it as ``loss_fn(model, batch)``
    with a TARGET batch; each call also takes the next control batch (cycling) and compares the
    remaining model with the full model's precomputed outputs there.

    Attributes:
        targets: the canonical names whose kept fraction the sparsity term reads (train
            ``si.find`` on the same ones).
        last: the three terms of the last call, as floats (``suppression``, ``maintenance``,
            ``critical_density``).
    """

    def __init__(
        self,
        model: Any,
        control_data: Iterable[Any],
        targets: Mapping[str, Target],
        forward: Forward,
        control_forward: Forward,
        weights: tuple[float, float, float],
    ):
        self.targets = dict(targets)
        self._forward, self._control_forward = forward, control_forward
        self._weights = weights
        self.last: dict[str, float] = {}
        root = adapters.resolve(model).root(model)
        device = device_of(root)
        self._controls: list[tuple[Any, Tensor]] = []
        with torch.no_grad(), evaluating(root):
            for batch in control_data:
                moved = to_device(batch, device)
                self._controls.append((moved, control_forward(model, moved).detach()))
        if not self._controls:
            raise ValueError(
                "`control_data` yielded no batches; give the control examples whose outputs the "
                "remaining model must keep (a list of batches)."
            )
        self._cycle = itertools.cycle(range(len(self._controls)))

    def kept_fraction(self, model: Any) -> Tensor:
        """Soft fraction of the targets' (non-zero) weights the model currently keeps:
        ``masked / original`` averaged over them; differentiable in the mask while ``si.find``
        trains it, 1 without a mask."""
        root = adapters.resolve(model).root(model)
        kept = torch.zeros((), device=device_of(root))
        count = 0
        for target in self.targets.values():
            module = root.get_submodule(target.module)
            masked = target.layout.to_canonical(getattr(module, target.attribute))
            original = target.layout.to_canonical(adapters.real_tensor(module, target.attribute))
            nonzero = original != 0
            ratio = masked.float()[nonzero] / original.detach().float()[nonzero]
            kept = kept + ratio.sum()
            count += int(nonzero.sum())
        return kept / max(count, 1)

    def __call__(self, model: Any, batch: Any) -> Tensor:
        suppress_weight, maintain_weight, sparsity_weight = self._weights
        suppression = suppression_loss(self._forward(model, batch))
        control, reference = self._controls[next(self._cycle)]
        control = to_device(control, reference.device)
        maintenance = maintenance_loss(self._control_forward(model, control), reference)
        critical = 1.0 - self.kept_fraction(model)
        self.last = {
            "suppression": float(suppression.detach()),
            "maintenance": float(maintenance.detach()),
            "critical_density": float(critical.detach()),
        }
        return (
            suppress_weight * suppression
            + maintain_weight * maintenance
            + sparsity_weight * critical
        )


def knowledge_critical(
    model: Any,
    control_data: Iterable[Any],
    *,
    forward: Forward | None = None,
    control_forward: Forward | None = None,
    targets: str | Iterable[str] | Mapping[str, Target] | None = None,
    suppression: float = 1.0,
    maintenance: float = 1.0,
    sparsity: float = 1.0,
) -> KnowledgeCritical:
    """Bayazit et al. 2024's knowledge-critical objective as a ``loss_fn`` for ``si.find``.

    ``loss = suppression * KL(U || p_remaining(target)) + maintenance * KL(p_full(control) ||
    p_remaining(control)) + sparsity * density(critical subnetwork)`` (see the module docstring
    for the convention: ``si.find`` learns the REMAINING model; :func:`critical_subnetwork`
    gives the knowledge-critical one). ``si.find``'s ``data`` are the target batches.

    Args:
        model: the model ``si.find`` will train a mask on; the full model's outputs on
            ``control_data`` are computed now, once, without a mask.
        control_data: control batches (e.g. ControlKG and ControlLM), cycled through, one per
            call; a list, re-iterable.
        forward: ``forward(model, batch) -> logits`` over the classes (last axis) for a target
            batch; default ``model(batch[0])`` (or ``model(batch)``), ``.logits`` if present.
        control_forward: the same for control batches; default ``forward``.
        targets: the weights the mask is trained on, as given to ``si.find`` (default: its
            default targets); the sparsity term reads their kept fraction.
        suppression: the weight of the suppression term (the paper weighs its terms too;
            the defaults here are 1, tune them per model).
        maintenance: the weight of the maintenance term.
        sparsity: the weight of the critical subnetwork's density.

    Returns:
        A :class:`KnowledgeCritical`, callable as ``loss_fn(model, batch)``. Train it with any
        learnable-mask method whose own sparsity penalty is off (see above).
    """
    for name, value in (
        ("suppression", suppression),
        ("maintenance", maintenance),
        ("sparsity", sparsity),
    ):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    chosen = select_targets(prepare(model), targets)
    forward = forward if forward is not None else _default_forward
    control_forward = control_forward if control_forward is not None else forward
    return KnowledgeCritical(
        model,
        control_data,
        chosen,
        forward,
        control_forward,
        (float(suppression), float(maintenance), float(sparsity)),
    )


def critical_subnetwork(found: FindResult | Subnetwork) -> Subnetwork:
    """The knowledge-critical subnetwork of a :func:`knowledge_critical` run: the weights the
    remaining model REMOVED, i.e. the complement (within the same targets) of the kept mask
    ``si.find`` returns. Removing it (``si.masked(model, ~critical)``, or equivalently keeping
    ``found.subnetwork``) suppresses the target behaviour."""
    subnetwork = found.subnetwork if isinstance(found, FindResult) else found
    if not isinstance(subnetwork, Subnetwork):
        raise TypeError(
            f"Expected a FindResult or a Subnetwork (the kept mask), got {type(found).__name__}."
        )
    return (~subnetwork).with_meta(role="knowledge-critical (removed) weights")


__all__ = [
    "KnowledgeCritical",
    "critical_subnetwork",
    "knowledge_critical",
    "maintenance_loss",
    "suppression_loss",
]
