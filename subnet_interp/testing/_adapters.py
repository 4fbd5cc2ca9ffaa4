"""si.testing.check_adapter: the conformance checks of a model family's adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import adapters
from .._find import find
from .._fingerprint import fingerprint, read_canonical
from .._masked import masked
from .._subnetwork import Subnetwork
from .._targets import targets as resolve_targets
from ..methods.continuous_sparsification_lepori import ContinuousSparsificationLepori
from ._common import check_unchanged, fail, state_copy


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`check_adapter` ran: the adapter's class, the targets checked, the checks."""

    adapter: str
    targets: tuple[str, ...]
    passed: tuple[str, ...]


class _Interrupt(Exception):
    pass


def _default_forward(model: Any, inputs: Any) -> Tensor:
    output = model(inputs)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    elif hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, Tensor):
        raise TypeError(
            f"check_adapter: the model returned {type(output).__name__}, not a tensor; pass "
            "`forward=lambda model, inputs: ...` returning the output tensor to compare."
        )
    return output


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def check_adapter(
    model: Any,
    inputs: Any,
    *,
    forward: Callable[[Any, Any], Tensor] | None = None,
    include: str | list[str] | None = None,
    seed: int = 0,
    biases: bool = False,
) -> AdapterReport:
    """Run the conformance checks on a model as its adapter sees it.

    Args:
        model: the model as users hold it (a Hugging Face model, a TransformerLens bridge, an
            nnsight wrapper, a plain ``nn.Module``, ...).
        inputs: one batch the model accepts.
        forward: ``forward(model, inputs) -> Tensor``; default calls ``model(inputs)`` and takes
            ``.logits`` / the first element / ``.last_hidden_state``.
        include: target patterns to check (default: the default targets).
        seed: seed of the random masks.
        biases: also check the bias and norm-weight targets (``si.targets(..., biases=True)``).

    Checks: targets resolve; each target's canonical view of its real tensor round-trips exactly
    and targets sharing a tensor do not overlap; an all-ones mask leaves the output unchanged
    and an all-zeros mask changes it; a random mask gives the output of zeroing the same weights
    by hand (a tensor several modules share, such as tied embeddings, zeroed at each module's
    read with that module's target's mask, as ``si.masked`` does); every weight is bit-exact after ``si.masked``, also after an exception inside it;
    the fingerprint is stable; ``si.find`` moves mask parameters of every target (a gradient
    reaches each, of whatever sign).
    """
    forward = forward or _default_forward
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    found = resolve_targets(model, include=include, biases=biases)
    if not found:
        fail("targets", f"{type(adapter).__name__} found no targets in {type(model).__name__}.")
    passed = ["targets"]

    _check_layouts(root, found)
    passed.append("layouts")

    before = state_copy(root)
    print_before = fingerprint(model)
    with torch.no_grad():
        reference = forward(model, inputs)
        ones = Subnetwork({n: torch.ones(t.shape, dtype=torch.bool) for n, t in found.items()})
        with masked(model, ones):
            kept = forward(model, inputs)
        with masked(model, ~ones):
            removed = forward(model, inputs)
    if not _close(kept, reference):
        fail("identity", "an all-ones mask changed the model's output.")
    if _close(removed, reference):
        fail(
            "effect", "an all-zeros mask left the output unchanged: masks do not reach the forward."
        )
    passed += ["identity", "effect"]

    generator = torch.Generator().manual_seed(seed)
    random_masks = {n: torch.rand(t.shape, generator=generator) < 0.5 for n, t in found.items()}
    with torch.no_grad():
        with masked(model, Subnetwork(random_masks)):
            attached = forward(model, inputs)
        by_hand = _zeroed_by_hand(model, root, found, random_masks, forward, inputs)
    if not _close(attached, by_hand):
        fail("by_hand", "a random mask's output differs from zeroing the same weights by hand.")
    passed.append("by_hand")
    check_unchanged("restore", root, before)

    try:
        with masked(model, Subnetwork(random_masks)):
            raise _Interrupt
    except _Interrupt:
        pass
    check_unchanged("restore_on_error", root, before)
    passed += ["restore", "restore_on_error"]

    if fingerprint(model) != print_before:
        fail("fingerprint", "the fingerprint changed after masking (or is not deterministic).")
    passed.append("fingerprint")

    _check_gradients(model, found, forward, inputs, seed)
    check_unchanged("find", root, before)
    passed.append("find")
    return AdapterReport(type(adapter).__name__, tuple(found), tuple(passed))


def _real(root: torch.nn.Module, target) -> Tensor:
    return adapters.real_tensor(root.get_submodule(target.module), target.attribute)


def _check_layouts(root: torch.nn.Module, found) -> None:
    coverage: dict[tuple[str, str], Tensor] = {}
    for name, target in found.items():
        real = _real(root, target)
        canonical = read_canonical(root, target)
        if tuple(canonical.shape) != tuple(target.shape):
            fail("layouts", f"{name}: canonical view has shape {tuple(canonical.shape)}, "
                  f"the target says {target.shape}.")  # fmt: skip
        buffer = torch.zeros_like(real.detach())
        written = target.layout.write_real(canonical.detach().clone(), buffer)
        if not torch.equal(target.layout.to_canonical(written), canonical.detach()):
            fail("layouts", f"{name}: writing the canonical tensor back does not round-trip.")
        count = coverage.setdefault(target.location, torch.zeros(real.shape, dtype=torch.int32))
        target.layout.to_canonical(count).add_(1)
    for location, count in coverage.items():
        if int(count.max()) > 1:
            fail("layouts", f"targets on {'.'.join(location)} overlap in the real tensor.")


def _zeroed_by_hand(model, root, found, masks, forward, inputs) -> Tensor:
    """The output with each target's weights zeroed by hand where its mask is 0.

    ``si.masked`` masks a weight where its module reads it, so a tensor two modules share (tied
    token embedding and unembedding) is masked by each module's own mask at its own read. Here
    such a module reads a masked copy of its own while the shared tensor stays as it is."""
    tied = _tied_locations(root, {t.location for t in found.values()})
    saved: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    swapped: list[tuple[torch.nn.Module, str, Tensor]] = []
    try:
        for location in tied:
            module = root.get_submodule(location[0])
            shared = module._parameters[location[1]]
            swapped.append((module, location[1], shared))
            copy = torch.nn.Parameter(shared.detach().clone(), requires_grad=False)
            module._parameters[location[1]] = copy
        for name, target in found.items():
            real = _real(root, target)
            saved.setdefault(target.location, (real, real.detach().clone()))
            view = target.layout.to_canonical(real.data)
            view.mul_(masks[name].to(view.dtype))
        return forward(model, inputs)
    finally:
        for real, value in saved.values():
            real.data.copy_(value)
        for module, attribute, shared in reversed(swapped):
            module._parameters[attribute] = shared


def _tied_locations(root: torch.nn.Module, locations) -> list[tuple[str, str]]:
    """The targeted ``(module, attribute)`` whose parameter another module also holds."""
    holders: dict[int, int] = {}
    for _, parameter in root.named_parameters(remove_duplicate=False):
        holders[id(parameter)] = holders.get(id(parameter), 0) + 1
    tied = []
    for path, attribute in locations:
        module = root.get_submodule(path)
        parameter = module._parameters.get(attribute)
        if parameter is not None and holders.get(id(parameter), 0) > 1:
            tied.append((path, attribute))
    return tied


def _check_gradients(model, found, forward, inputs, seed: int) -> None:
    # Lepori et al.'s gates start at s = mask_init; with no penalty, Adam moves an s only where
    # the loss's gradient reached it. The loss is a random projection of the output.
    with torch.no_grad():
        shape = forward(model, inputs).shape
    projection = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def loss(m, batch):
        output = forward(m, batch)
        return (output.float() * projection.to(output.device)).sum()

    method = ContinuousSparsificationLepori(l0_lambda=0.0)  # no penalty: the loss alone moves s
    result = find(model, method, loss, [inputs], steps=2, targets=found, progress=False)
    # whatever the gradient's sign: the mask s > 0 misses a target whose gradients all point one
    # way (likely for a tiny one)
    dead = [n for n in found if not bool((result.scores[n] != method.mask_init).any())]
    if dead:
        fail(
            "find",
            f"mask parameters of {dead[:8]} did not move in two steps of si.find: no gradient "
            "reaches them (is the weight read by the forward you passed? choose `include=`).",
        )
